#!/usr/bin/env python3
"""
Compare two versions of txthreatbus on the 2020 workloads of run.py, back to
back: this checkout and an earlier git revision, each installed into a venv
of its own (under a TemporaryDirectory), their runs alternating (in ABBA
order), and the median of each printed with the ratio new/old.

Both run without the intel store: each gets ``store: false`` if it knows the
store key (its ``txthreatbus check-config`` takes it), and no store key if it
does not (a version before the store, which has none).

    python bench/compare.py REV [--runs 5] [--only "1 subscriber"]

Both versions use ports 13370-13372 on 127.0.0.1: run nothing else there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from run import CONFIG, HERE, WORKLOADS, knows_store, run_e2e, with_store

REPO = os.path.dirname(HERE)


def install(source: str, venv: str) -> str:
    """A venv at ``venv`` with txthreatbus installed from ``source``; its twistd."""
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run(
        [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", source],
        check=True,
    )
    return os.path.join(venv, "bin", "twistd")


def export(rev: str, directory: str) -> None:
    """Write the tree of git revision ``rev`` into ``directory``."""
    archive = subprocess.run(["git", "-C", REPO, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the earlier version: a git revision of this repository")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", help="run only workloads whose name contains this")
    args = ap.parse_args()
    e2e = os.path.join(HERE, "e2e.py")
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = os.path.join(tmp, "old-tree")
        os.mkdir(old_tree)
        export(args.rev, old_tree)
        versions = {
            "new": install(REPO, os.path.join(tmp, "new")),
            "old": install(old_tree, os.path.join(tmp, "old")),
        }
        configs = {}
        for version, twistd in versions.items():
            store = knows_store(os.path.dirname(twistd))
            configs[version] = os.path.join(tmp, version + ".yaml")
            with open(configs[version], "w") as f:
                f.write(with_store(CONFIG, False if store else None))
            print(f"{version}: {'store: false' if store else 'no store key (a version before the store)'}",
                  file=sys.stderr)
        print(f"{'workload':<18} {'figure':<17} {'old (' + args.rev[:10] + ')':>18} {'new':>12} {'new/old':>8}")
        for name, wargs, figure, _target, _better in WORKLOADS:
            if args.only and args.only not in name:
                continue
            figures = {"old": [], "new": []}
            for run in range(args.runs):
                # ABBA order: neither version always runs right after the other
                for version in ("new", "old") if run % 2 == 0 else ("old", "new"):
                    twistd = versions[version]
                    pidfile = os.path.join(tmp, version + ".pid")
                    server = f"{twistd} --pidfile {pidfile} -n zmq-app --config {configs[version]}"
                    result = run_e2e(e2e, wargs, server)
                    if result.get("loss"):
                        raise SystemExit(f"{version} lost {result['loss']} messages in {name}")
                    figures[version].append(result[figure])
            old, new = (statistics.median(figures[v]) for v in ("old", "new"))
            print(f"{name:<18} {figure:<17} {old:>18,.1f} {new:>12,.1f} {new / old:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
