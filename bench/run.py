#!/usr/bin/env python3
"""
Benchmark txthreatbus against the yardstick, back to back, and write the
README's performance table.

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

Each table is printed to stdout as soon as its rows ran. After a full run
(every workload, the reference included, so no --only or --skip-reference)
the figures go to --results (default: bench/results.json: the medians,
ratios, targets, whether each was met, the number of runs, the date and the
machine), and the tables to README.md (--readme), between the lines
``<!-- bench/run.py: begin -->`` and ``<!-- bench/run.py: end -->``; a
partial run writes nothing, and --no-write only prints. ``render`` makes
that block from the results alone, so ``--render`` rewrites it from
bench/results.json without running anything.

    python bench/run.py [--limit-server PATH] [--e2e PATH] [--runs 3]
                        [--only NAME] [--skip-reference] [--reference-venv DIR]
                        [--snapshot-runs N] [--no-write]
                        [--readme PATH] [--results PATH]
    python bench/run.py --render [--readme PATH] [--results PATH]

All servers use ports 13370-13372 on 127.0.0.1: run nothing else there.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(HERE, "results.json")

#: The lines around the README's generated block.
BEGIN = "<!-- bench/run.py: begin -->"
END = "<!-- bench/run.py: end -->"

# name, e2e.py arguments, figure, target ratio, better when
WORKLOADS = [
    ("1 subscriber", "throughput -n 20000 --subscribers 1", "deliveries_per_s", 0.75, "higher"),
    ("10 subscribers", "throughput -n 2000 --subscribers 10", "deliveries_per_s", 1.2, "higher"),
    ("2000 subscribers", "throughput -n 100 --subscribers 2000", "deliveries_per_s", 1.5, "higher"),
    ("manage", "manage -n 2000", "rpc_per_s", 1.0, "higher"),
    ("p99 at 1000/s", "throughput -n 3000 --rate 1000 --rate-batch 10", "lat_p99_ms", 1.2, "lower"),
]
#: The memory row: idle subscriptions made, and the target for each one's RSS (bytes)
MEMORY_ROW = "memory"
MEMORY_SUBSCRIPTIONS = 10_000
MEMORY_TARGET_B = 1024

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


def idle_subscription_memory(server: str, n: int = MEMORY_SUBSCRIPTIONS) -> float:
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


def selected(only: str | None, name: str) -> bool:
    """Whether --only ``only`` picks the row ``name``."""
    return not only or only in name


def machine() -> dict:
    """A short description of this machine, for the results."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit-server", default=os.path.join(HERE, "limit_server.py"))
    ap.add_argument("--e2e", default=os.path.join(HERE, "e2e.py"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", help="run only workloads whose name contains this (writes nothing)")
    ap.add_argument("--skip-reference", action="store_true",
                    help="STIX rows: do not run the reference, Threat Bus 2022.5.16 (writes nothing)")
    ap.add_argument("--reference-venv", default=default_reference_venv(),
                    help="the reference's venv, made on first use (default: %(default)s)")
    ap.add_argument("--snapshot-runs", type=int,
                    help="runs of the snapshot row (default: --runs)")
    ap.add_argument("--no-write", action="store_true",
                    help="only print the tables: write neither --results nor --readme")
    ap.add_argument("--readme", default=README,
                    help="the README whose generated block gets the tables (default: %(default)s)")
    ap.add_argument("--results", default=RESULTS,
                    help="the figures of a full run, as JSON (default: %(default)s)")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: rewrite --readme's block from --results")
    args = ap.parse_args()

    if args.render:
        if not os.path.exists(args.results):
            raise SystemExit(f"{args.results} does not exist: a full run of bench/run.py writes it")
        check_readme(args.readme)
        write_readme(args.readme, render(load_results(args.results)))
        print(f"wrote the tables of {args.results} into {args.readme}", file=sys.stderr)
        return
    partial = "--only" if args.only else "--skip-reference" if args.skip_reference else None
    if not args.no_write and not partial:
        check_readme(args.readme)  # before the run, not after ten minutes of it

    bindir = os.path.dirname(sys.executable)
    store_known = knows_store(bindir)
    if not store_known:
        print("this txthreatbus does not know the store key: its config leaves it out, "
              "and the store rows cannot run", file=sys.stderr)
    results = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "runs": args.runs,
               "snapshot_runs": args.snapshot_runs or args.runs, "machine": machine()}
    ok = True
    with tempfile.TemporaryDirectory(prefix="txthreatbus-bench-") as scratch:
        config = os.path.join(scratch, "config.yaml")
        with open(config, "w") as f:
            f.write(with_store(CONFIG, False if store_known else None))
        twistd = os.path.join(bindir, "twistd")
        ours = f"{twistd} --pidfile {os.path.join(scratch, 'twistd.pid')} -n zmq-app --config {config}"
        limit = f"{sys.executable} {args.limit_server}"
        results["main"] = run(args, ours, limit)
        show(results, "main")
        if any(selected(args.only, w[0]) for w in STIX_WORKLOADS):
            reference = None
            if not args.skip_reference:
                # a folder of its own: threatbus also reads config.yaml and .env from where it runs
                refdir = os.path.join(scratch, "reference")
                os.mkdir(refdir)
                with open(os.path.join(refdir, "config.yaml"), "w") as f:
                    f.write(REFERENCE_CONFIG)
                threatbus = reference_threatbus(args.reference_venv)
                reference = f"cd {shlex.quote(refdir)} && exec {shlex.quote(threatbus)} -c config.yaml"
            results["stix"] = run_stix(args, ours, limit, reference)
            show(results, "stix")
        if any(selected(args.only, name) for name in [w[0] for w in STORE_WORKLOADS] + [SNAPSHOT_ROW]):
            if store_known:
                results["store"] = run_store(args, twistd, ours, scratch)
                show(results, "store")
            else:
                print("\nstore rows: not run, this txthreatbus does not know the store key")
                ok = False
                partial = partial or "no store rows"
    rows = results["main"] + results.get("stix", {}).get("rows", []) + results.get("store", [])
    ok &= all(row["met"] for row in rows)
    if args.no_write:
        pass
    elif partial:
        print(f"a partial run ({partial}): {args.results} and {args.readme} left as they were", file=sys.stderr)
    else:
        write_results(args.results, results)
        write_readme(args.readme, render(results))
        print(f"wrote {args.results}, and its tables into {args.readme}", file=sys.stderr)
    sys.exit(0 if ok else 1)


def show(results: dict, table: str) -> None:
    """Print one table of ``results``, as render puts it in the README."""
    if results[table]:
        print()
        print(render({table: results[table]}), end="")


def sign_of(better: str) -> str:
    return ">=" if better == "higher" else "<="


def ratio(a, b):
    """``a / b``, or None if either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


def judged(row: dict) -> dict:
    """``row`` with whether it met its target."""
    return {**row, "met": meets(row)}


def run(args, ours: str, limit: str) -> list:
    """Run the workloads against ``ours`` and ``limit``, and the memory row: the main table's rows."""

    rows = []
    for name, wargs, figure, target, better in WORKLOADS:
        if not selected(args.only, name):
            continue
        results = {"ours": [], "limit": []}
        for _ in range(args.runs):
            for who, server in (("ours", ours), ("limit", limit)):
                r = run_e2e(args.e2e, wargs, server)
                results[who].append(r)
                print(f"  {name:16} {who:5} {json.dumps(r)}", file=sys.stderr)
        ours_v = statistics.median(r[figure] for r in results["ours"])
        limit_v = statistics.median(r[figure] for r in results["limit"])
        rows.append(judged({
            "workload": name, "figure": figure, "ours": ours_v, "limit": limit_v,
            "ratio": ratio(ours_v, limit_v), "sign": sign_of(better), "target": target,
            "loss": max(r.get("loss", 0) for r in results["ours"]),
        }))
    if selected(args.only, MEMORY_ROW):
        rows.append(judged({
            "workload": MEMORY_ROW, "figure": f"RSS per idle subscription ({MEMORY_SUBSCRIPTIONS:,})",
            "value": idle_subscription_memory(ours), "unit": "B",
            "sign": "<=", "target": MEMORY_TARGET_B, "loss": None,
        }))
    return rows


def run_stix(args, ours: str, limit: str, reference: str | None) -> dict:
    """Run the STIX workloads against ``ours``, ``limit`` and ``reference``
    (None: skipped): the STIX table, its reference's packages (None: not run) and its rows."""

    servers = [("ours", ours), ("limit", limit)] + ([("ref", reference)] if reference else [])
    rows = []
    for name, wargs, ref_args, figure, target, better in STIX_WORKLOADS:
        if not selected(args.only, name):
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
        rows.append(judged({
            "workload": name, "figure": figure, "ours": ours_v, "limit": limit_v, "ref": ref_v,
            "ratio": ratio(ours_v, limit_v), "ref_ratio": ratio(ref_v, limit_v),
            "sign": sign_of(better), "target": target, "loss": loss("ours"), "ref_loss": loss("ref"),
        }))
    return {"reference": " ".join(REFERENCE_PACKAGES) if reference else None, "rows": rows}


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


def run_store(args, twistd: str, off: str, scratch: str) -> list:
    """Run the store rows: the workloads with the store on and ``off``,
    alternating, and the snapshot: the store table's rows."""

    import shutil

    rows = []
    runs = 0
    for name, wargs, figure, target, better in STORE_WORKLOADS:
        if not selected(args.only, name):
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
        rows.append(judged({
            "workload": name, "figure": figure, "on": on_v, "off": off_v, "ratio": ratio(on_v, off_v),
            "sign": sign_of(better), "target": target,
            "loss": max(r.get("loss", 0) for r in results["on"] + results["off"]),
        }))

    if selected(args.only, SNAPSHOT_ROW):
        snapshot = os.path.join(HERE, "snapshot.py")
        results = []
        for _ in range(args.snapshot_runs or args.runs):
            r = run_snapshot(snapshot, twistd)
            results.append(r)
            print(f"  {SNAPSHOT_ROW:20} {json.dumps(r)}", file=sys.stderr)
        seconds = statistics.median(r["snapshot_s"] if r["complete"] else float("inf") for r in results)
        peak = max(r["rss_peak_growth_mib"] for r in results)
        rows.append(judged({  # an incomplete snapshot lost items: its row is missed
            "workload": SNAPSHOT_ROW, "figure": f"time until {SNAPSHOT_ITEMS:,} live intel arrived",
            "value": None if seconds == float("inf") else seconds, "unit": "s",
            "sign": "<", "target": SNAPSHOT_TARGET_S,
            "loss": max(SNAPSHOT_ITEMS - r["received"] for r in results),
        }))
        rows.append(judged({
            "workload": SNAPSHOT_ROW, "figure": f"bus RSS growth (peak {peak:,.1f} MiB)",
            "value": statistics.median(r["rss_growth_mib"] for r in results), "unit": "MiB",
            "sign": "<", "target": SNAPSHOT_TARGET_MIB, "loss": None,
        }))
    return rows


# The tables, from the results alone. A row is judged on its ratio, or, a
# row without one (memory, snapshot), on its value, in its unit.

COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
UNIT_FORMATS = {"B": "{:,.0f} B", "s": "{:,.2f} s", "MiB": "{:,.1f} MiB"}


def meets(row: dict) -> bool:
    """Whether ``row`` met its target (None: any figure does), nothing lost."""
    value = row["ratio"] if "ratio" in row else row["value"]
    if value is None or row.get("loss"):
        return False
    return row["target"] is None or COMPARE[row["sign"]](value, row["target"])


def render(results: dict) -> str:
    """The README's block: where and how the figures were measured (when
    ``results`` say), then each table ``results`` hold, in markdown."""
    parts = []
    if "runs" in results:
        parts.append(provenance(results))
    if results.get("main"):
        parts.append("Against the yardstick, `bench/limit_server.py`:\n\n" + render_main(results["main"]))
    if results.get("stix"):
        parts.append("The STIX-2.1 generation, against the yardstick and the reference, "
                     "Threat Bus 2022.5.16:\n\n" + render_stix(results["stix"]))
    if results.get("store"):
        parts.append("What the intel store costs (the SQLite store on against off), "
                     "and a snapshot of live intel:\n\n" + render_store(results["store"]))
    return "\n".join(parts)


def provenance(results: dict) -> str:
    m = results["machine"]
    runs = f"medians of {results['runs']} runs each"
    if results.get("snapshot_runs", results["runs"]) != results["runs"]:
        runs += f" ({results['snapshot_runs']} of the snapshot)"
    return (f"Written by `python bench/run.py` on {results['date']}: {runs}, the servers side by side, "
            f"on {m['platform']}, {m['cpus']} CPUs, Python {m['python']}. "
            f"The figures unrounded: [bench/results.json](bench/results.json).\n")


def render_main(rows: list) -> str:
    return ratio_table(("txthreatbus", "limit_server", "ratio"), ("ours", "limit"), rows)


def render_store(rows: list) -> str:
    return ratio_table(("store on", "store off", "on/off"), ("on", "off"), rows)


def render_stix(stix: dict) -> str:
    ran = stix["reference"] is not None
    head = ["workload", "figure", "txthreatbus:", "stix yardstick:", "reference:", "txthreatbus/yardstick:",
            "reference/yardstick:", "target:", "loss:", "reference loss:", "met"]
    lines = []
    for row in stix["rows"]:
        ref_format = "{:.3f}" if row["sign"].startswith(">") else "{:.2f}"
        lines.append([
            row["workload"], row["figure"], number(row["ours"]), number(row["limit"]),
            number(row["ref"]) if ran else "skipped", number(row["ratio"], "{:.2f}"),
            number(row["ref_ratio"], ref_format) if ran else "", target_cell(row),
            number(row["loss"], "{}"), number(row["ref_loss"], "{}") if ran else "", met_cell(row),
        ])
    return table(head, lines)


def ratio_table(columns: tuple, keys: tuple, rows: list) -> str:
    """A table of two figures (``columns`` their headings and their ratio's,
    ``keys`` their keys in a row) and their ratio; a row without a ratio shows its value."""
    head = ["workload", "figure", *(c + ":" for c in columns), "target:", "loss:", "met"]
    lines = []
    for row in rows:
        if "ratio" in row:
            figures = [number(row[keys[0]]), number(row[keys[1]]), number(row["ratio"], "{:.2f}")]
        else:
            figures = [number(row["value"], UNIT_FORMATS[row["unit"]]), "", ""]
        loss = "" if row["loss"] is None else str(row["loss"])
        lines.append([row["workload"], row["figure"], *figures, target_cell(row), loss, met_cell(row)])
    return table(head, lines)


def table(head: list, lines: list) -> str:
    """A markdown table: ``head`` its headings (ending in ":" for a column
    aligned right), ``lines`` lists of cells."""
    out = ["| " + " | ".join(h.rstrip(":") for h in head) + " |",
           "|" + "|".join("---:" if h.endswith(":") else "---" for h in head) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out) + "\n"


def number(value, fmt: str = "{:,.1f}") -> str:
    return "failed" if value is None else fmt.format(value)


def target_cell(row: dict) -> str:
    if row["target"] is None:
        return "-"
    unit = f" {row['unit']}" if row.get("unit") else ""
    return f"{row['sign']} {row['target']:g}{unit}"


def met_cell(row: dict) -> str:
    return "yes" if meets(row) else "NO"


# The files: the results, and the README's block.

def replace_block(text: str, block: str) -> str:
    """``text`` with the lines between its BEGIN and END lines replaced by ``block``."""
    begin, end = text.find(BEGIN + "\n"), text.find("\n" + END)
    if text.count(BEGIN) != 1 or text.count(END) != 1 or begin < 0 or end < begin:
        raise ValueError(f"not one {BEGIN} line, then one {END} line")
    if block and not block.endswith("\n"):
        block += "\n"
    return text[: begin + len(BEGIN) + 1] + block + text[end + 1 :]


def check_readme(path: str) -> None:
    """Exit unless ``path`` has a block to write the tables into."""
    try:
        with open(path, encoding="utf-8") as f:
            replace_block(f.read(), "")
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: {e}")


def write_readme(path: str, block: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    write_file(path, replace_block(text, block))


def write_results(path: str, results: dict) -> None:
    write_file(path, json.dumps(results, indent=2, allow_nan=False) + "\n")


def load_results(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
