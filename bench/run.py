#!/usr/bin/env python3
"""
Benchmark txthreatbus against the yardstick, back to back.

Runs each workload of e2e.py (beside this script) against txthreatbus
(``twistd -n zmq-app``) and against limit_server.py, alternating, takes the
median of --runs runs of each, and prints a table of ratios against the
targets. Also measures the resident memory an idle subscription costs.

The STIX rows run e2e.py's 2022 generation (threatbus-zmq 2022.5.16,
STIX-2.1 Indicators on stix2/indicator) against txthreatbus, limit_server.py
(which routes stix2/ topics just as blindly) and the reference, Threat Bus
2022.5.16 itself (threatbus, threatbus-zmq and threatbus-inmem from PyPI,
installed on first use into a venv of its own, by default under
~/.cache/txthreatbus-bench), and print both txthreatbus/yardstick and
reference/yardstick. The reference is slow, so it gets fewer messages.

Every row above measures txthreatbus with ``store: false`` (no intel store,
as the figures before the store did), or without the key for a txthreatbus
that does not know it. The store rows measure the store's own cost: the
1-subscriber and p99 workloads against txthreatbus with the SQLite store (a
new database in a temporary directory each run) and without, alternating,
printed as on/off; and the snapshot row runs snapshot.py (beside this
script): the time a snapshot of 100,000 live Intel items takes to reach its
requester, and the bus's RSS growth while it answers.

    python bench/run.py [--limit-server PATH] [--e2e PATH] [--runs 3]
                        [--only NAME] [--skip-reference] [--reference-venv DIR]
                        [--snapshot-runs N]

All servers use ports 13370-13372 on 127.0.0.1: run nothing else there.
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

# The store's cost (run with the SQLite store on and off): name, e2e.py
# arguments, figure, target ratio on/off, better when
STORE_WORKLOADS = [
    ("store 1 subscriber", "throughput -n 20000 --subscribers 1", "deliveries_per_s", 0.8, "higher"),
    ("store p99 at 1000/s", "throughput -n 3000 --rate 1000 --rate-batch 10", "lat_p99_ms", 1.5, "lower"),
]
#: The snapshot row: live Intel items, and targets for the seconds until all
#: reached the requester and the bus's RSS growth meanwhile (MiB)
SNAPSHOT_ROW = "store snapshot"
SNAPSHOT_ITEMS = 100_000
SNAPSHOT_TARGET_S = 10.0
SNAPSHOT_TARGET_MIB = 50.0

# The 2022 generation (STIX-2.1): name, e2e.py arguments, the reference's
# e2e.py arguments (fewer messages: it delivers about 1% of the yardstick's
# rate), figure, target ratio (None: reported, no target), better when
STIX_WORKLOADS = [
    ("STIX 1 subscriber", "throughput --generation 2022 -n 20000 --subscribers 1",
     "throughput --generation 2022 -n 2000 --subscribers 1", "deliveries_per_s", 0.25, "higher"),
    ("STIX 10 subscribers", "throughput --generation 2022 -n 2000 --subscribers 10",
     "throughput --generation 2022 -n 1000 --subscribers 10", "deliveries_per_s", 0.5, "higher"),
    ("STIX p99 at 500/s", "throughput --generation 2022 -n 3000 --rate 500 --rate-batch 5",
     "throughput --generation 2022 -n 3000 --rate 500 --rate-batch 5", "lat_p99_ms", None, "lower"),
]

#: The reference of the STIX rows, pinned, and what it costs to set up.
REFERENCE_PACKAGES = ["threatbus==2022.5.16", "threatbus-zmq==2022.5.16", "threatbus-inmem==2022.5.16"]

#: Its config (a Threat Bus 2022 config.yaml), logging only warnings as ours does.
REFERENCE_CONFIG = """\
logging:
  console: true
  console_verbosity: WARNING
  file: false
plugins:
  backbones:
    inmem: {}
  apps:
    zmq:
      host: 127.0.0.1
      manage: 13370
      pub: 13371
      sub: 13372
"""

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


def with_store(config: str, store) -> str:
    """``config`` with a top-level store key: None leaves it out (the bus's
    default, and all a txthreatbus before the store accepts), False is
    ``store: false``, a string the url of a store."""
    if store is None:
        return config
    if store is False:
        return "store: false\n" + config
    return f"store:\n  url: {json.dumps(store)}\n" + config


def knows_store(bindir: str) -> bool:
    """Whether the txthreatbus installed in ``bindir`` knows the store key
    (its ``check-config`` takes ``store: false``)."""
    cli = os.path.join(bindir, "txthreatbus")
    if not os.path.exists(cli):
        return False
    with tempfile.TemporaryDirectory(prefix="txthreatbus-check-") as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            f.write(with_store(CONFIG, False))
        out = subprocess.run([cli, "check-config", path], capture_output=True, text=True, timeout=120)
    if out.returncode == 0:
        return True
    message = (out.stderr + out.stdout).strip()
    if "store" not in message:  # e.g. a version without check-config
        print(f"{cli} check-config: {message[-300:]}; taken as not knowing the store key", file=sys.stderr)
    return False


def run_e2e(e2e: str, args: str, server: str) -> dict:
    cmd = [sys.executable, e2e, *shlex.split(args), "--server", server]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"e2e.py failed ({' '.join(cmd)}):\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])


def try_e2e(e2e: str, args: str, server: str):
    """run_e2e's figures, or None (and why, on stderr) if the run failed."""
    try:
        return run_e2e(e2e, args, server)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return None


def default_reference_venv(name: str = "threatbus-2022.5.16") -> str:
    """Where a reference ``name`` is installed: a cache, kept between runs."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "txthreatbus-bench", name)


def reference_threatbus(venv: str, packages=REFERENCE_PACKAGES) -> str:
    """The ``threatbus`` console script of the reference's venv, ``packages`` installed first if need be."""
    threatbus = os.path.join(venv, "bin", "threatbus")
    done = os.path.join(venv, ".installed")  # written last: a half-made venv is made anew
    if not os.path.exists(done):
        print(f"installing the reference ({', '.join(packages)}) into {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", *packages], check=True)
        with open(done, "w") as f:
            f.write("\n".join(packages) + "\n")
    return threatbus


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
    ap.add_argument("--skip-reference", action="store_true",
                    help="STIX rows: do not run the reference, Threat Bus 2022.5.16")
    ap.add_argument("--reference-venv", default=default_reference_venv(),
                    help="the reference's venv, made on first use (default: %(default)s)")
    ap.add_argument("--snapshot-runs", type=int,
                    help="runs of the snapshot row (default: --runs)")
    args = ap.parse_args()

    bindir = os.path.dirname(sys.executable)
    store_known = knows_store(bindir)
    if not store_known:
        print("this txthreatbus does not know the store key: its config leaves it out, "
              "and the store rows cannot run", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="txthreatbus-bench-") as scratch:
        config = os.path.join(scratch, "config.yaml")
        with open(config, "w") as f:
            f.write(with_store(CONFIG, False if store_known else None))
        twistd = os.path.join(bindir, "twistd")
        ours = f"{twistd} --pidfile {os.path.join(scratch, 'twistd.pid')} -n zmq-app --config {config}"
        limit = f"{sys.executable} {args.limit_server}"
        ok = run(args, ours, limit)
        if any(not args.only or args.only in w[0] for w in STIX_WORKLOADS):
            reference = None
            if not args.skip_reference:
                # a folder of its own: threatbus also reads config.yaml and .env from where it runs
                refdir = os.path.join(scratch, "reference")
                os.mkdir(refdir)
                with open(os.path.join(refdir, "config.yaml"), "w") as f:
                    f.write(REFERENCE_CONFIG)
                threatbus = reference_threatbus(args.reference_venv)
                reference = f"cd {shlex.quote(refdir)} && exec {shlex.quote(threatbus)} -c config.yaml"
            ok &= run_stix(args, ours, limit, reference)
        if any(not args.only or args.only in name
               for name in [w[0] for w in STORE_WORKLOADS] + [SNAPSHOT_ROW]):
            ok &= run_store(args, twistd, ours, scratch, store_known)
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

    if not rows and args.only and "memory" not in args.only:
        return ok
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


def run_stix(args, ours: str, limit: str, reference: str | None) -> bool:
    """Run the STIX workloads against ``ours``, ``limit`` and ``reference``
    (None: skipped), print their table; whether every target was met."""

    servers = [("ours", ours), ("limit", limit)] + ([("ref", reference)] if reference else [])
    rows = []
    ok = True
    for name, wargs, ref_args, figure, target, better in STIX_WORKLOADS:
        if args.only and args.only not in name:
            continue
        results = {who: [] for who, _ in servers}
        failed = set()  # a server that failed a run of this row is not run again for it
        for _ in range(args.runs):
            for who, server in servers:
                if who in failed:
                    continue
                r = try_e2e(args.e2e, ref_args if who == "ref" else wargs, server)
                if r is None:
                    failed.add(who)
                    continue
                results[who].append(r)
                print(f"  {name:20} {who:5} {json.dumps(r)}", file=sys.stderr)

        def median(who):
            rs = results.get(who)
            return statistics.median(r[figure] for r in rs) if rs else None

        def loss(who):
            rs = results.get(who)
            return max(r.get("loss", 0) + r.get("wrong_topic", 0) for r in rs) if rs else None

        ours_v, limit_v, ref_v = median("ours"), median("limit"), median("ref")
        ratio = ours_v / limit_v if ours_v is not None and limit_v else None
        ref_ratio = ref_v / limit_v if ref_v is not None and limit_v else None
        met = ratio is not None and loss("ours") == 0 and (
            target is None or (ratio >= target if better == "higher" else ratio <= target))
        ok &= met
        rows.append((name, figure, ours_v, limit_v, ref_v, ratio, ref_ratio, target, better,
                     loss("ours"), loss("ref"), met))

    def num(v, fmt="{:,.1f}"):
        return "failed" if v is None else fmt.format(v)

    print()
    print("| workload | figure | txthreatbus | stix yardstick | reference | txthreatbus/yardstick "
          "| reference/yardstick | target | loss | reference loss | met |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, figure, o, l, r, ratio, ref_ratio, target, better, loss_o, loss_r, met in rows:
        sign = ">=" if better == "higher" else "<="
        print(
            f"| {name} | {figure} | {num(o)} | {num(l)} | {'skipped' if reference is None else num(r)} "
            f"| {num(ratio, '{:.2f}')} | {'' if reference is None else num(ref_ratio, '{:.3f}' if better == 'higher' else '{:.2f}')} "
            f"| {'-' if target is None else f'{sign} {target}'} | {num(loss_o, '{}')} "
            f"| {'' if reference is None else num(loss_r, '{}')} | {'yes' if met else 'NO'} |"
        )
    return ok


def store_server(twistd: str, scratch: str, run: int) -> tuple:
    """A command running txthreatbus with the SQLite store in a new directory, and that directory."""
    directory = os.path.join(scratch, f"store-{run}")
    os.mkdir(directory)
    config = os.path.join(directory, "config.yaml")
    with open(config, "w") as f:
        f.write(with_store(CONFIG, "sqlite:///" + os.path.join(directory, "intel.sqlite")))
    # from its directory: nothing of the bus lands in the caller's
    server = (f"cd {shlex.quote(directory)} && exec {shlex.quote(twistd)} "
              f"--pidfile {shlex.quote(os.path.join(directory, 'twistd.pid'))} -n zmq-app "
              f"--config {shlex.quote(config)}")
    return server, directory


def run_snapshot(snapshot: str, twistd: str) -> dict:
    cmd = [sys.executable, snapshot, "-n", str(SNAPSHOT_ITEMS), "--twistd", twistd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"snapshot.py failed ({' '.join(cmd)}):\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])


def run_store(args, twistd: str, off: str, scratch: str, store_known: bool) -> bool:
    """Run the store rows: the workloads with the store on and ``off``,
    alternating, and the snapshot; print their table; whether every target was met."""

    import shutil

    if not store_known:
        print()
        print("| store rows | not run: this txthreatbus does not know the store key | | | | | | NO |")
        return False
    rows = []
    ok = True
    runs = 0
    for name, wargs, figure, target, better in STORE_WORKLOADS:
        if args.only and args.only not in name:
            continue
        results = {"on": [], "off": []}
        for i in range(args.runs):
            # on first in even runs, off first in odd ones: neither always runs second
            for who in ("on", "off") if i % 2 == 0 else ("off", "on"):
                if who == "on":
                    server, directory = store_server(twistd, scratch, runs)
                    runs += 1
                else:
                    server, directory = off, None
                r = run_e2e(args.e2e, wargs, server)
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
                results[who].append(r)
                print(f"  {name:20} {who:5} {json.dumps(r)}", file=sys.stderr)
        on_v = statistics.median(r[figure] for r in results["on"])
        off_v = statistics.median(r[figure] for r in results["off"])
        loss = max(r.get("loss", 0) for r in results["on"] + results["off"])
        ratio = on_v / off_v if off_v else float("inf")
        met = (ratio >= target if better == "higher" else ratio <= target) and loss == 0
        ok &= met
        sign = ">=" if better == "higher" else "<="
        rows.append(f"| {name} | {figure} | {on_v:,.1f} | {off_v:,.1f} | {ratio:.2f} | {sign} {target} "
                    f"| {loss} | {'yes' if met else 'NO'} |")

    if not args.only or args.only in SNAPSHOT_ROW:
        snapshot = os.path.join(HERE, "snapshot.py")
        results = []
        for _ in range(args.snapshot_runs or args.runs):
            r = run_snapshot(snapshot, twistd)
            results.append(r)
            print(f"  {SNAPSHOT_ROW:20} {json.dumps(r)}", file=sys.stderr)
        complete = all(r["complete"] for r in results)
        missing = max(SNAPSHOT_ITEMS - r["received"] for r in results)
        seconds = statistics.median(r["snapshot_s"] if r["complete"] else float("inf") for r in results)
        growth = statistics.median(r["rss_growth_mib"] for r in results)
        peak = max(r["rss_peak_growth_mib"] for r in results)
        met_s = complete and seconds < SNAPSHOT_TARGET_S
        met_m = growth < SNAPSHOT_TARGET_MIB
        ok &= met_s and met_m
        rows.append(f"| {SNAPSHOT_ROW} | s until {SNAPSHOT_ITEMS:,} live intel arrived | {seconds:,.2f} | | "
                    f"| < {SNAPSHOT_TARGET_S:g} s | {missing} | {'yes' if met_s else 'NO'} |")
        rows.append(f"| {SNAPSHOT_ROW} | bus RSS growth, MiB (peak {peak:,.1f}) | {growth:,.1f} | | "
                    f"| < {SNAPSHOT_TARGET_MIB:g} MiB | | {'yes' if met_m else 'NO'} |")

    print()
    print("| workload | figure | store on | store off | on/off | target | loss | met |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(row)
    return ok


if __name__ == "__main__":
    main()
