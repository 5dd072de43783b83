"""
The README's performance tables are bench/run.py's: the block between its
markers is exactly what ``render`` makes of bench/results.json, render
judges each row against its target, and writing the block leaves the rest
of the README as it was.
"""

from __future__ import annotations

import importlib.util
import json
import os

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "bench", "results.json")


def load_run():
    """bench/run.py as a module (not run: it only defines)."""
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = load_run()


def block_of(text: str) -> str:
    """The lines between the README's marker lines."""
    head, begin, rest = text.partition(run.BEGIN + "\n")
    block, end, tail = rest.partition(run.END)
    assert begin and end, "no bench/run.py block"
    return block


def ratio_row(workload, ours, limit, sign, target, loss=0):
    return {"workload": workload, "figure": "deliveries_per_s", "ours": ours, "limit": limit,
            "ratio": ours / limit, "sign": sign, "target": target, "loss": loss}


#: Made-up results: a row met and one missed each way, in every table.
RESULTS_FIXTURE = {
    "date": "2000-01-01",
    "runs": 3,
    "snapshot_runs": 3,
    "machine": {"cpus": 2, "platform": "Linux-test", "python": "3.12.0"},
    "main": [
        ratio_row("high met", 90.0, 100.0, ">=", 0.75),
        ratio_row("high missed", 50.0, 100.0, ">=", 0.75),
        ratio_row("high met but lost", 90.0, 100.0, ">=", 0.75, loss=3),
        ratio_row("low met", 1.1, 1.0, "<=", 1.2),
        ratio_row("low missed", 1.5, 1.0, "<=", 1.2),
        {"workload": "memory met", "figure": "RSS per idle subscription (10,000)", "value": 900.0,
         "unit": "B", "sign": "<=", "target": 1024, "loss": None},
        {"workload": "memory missed", "figure": "RSS per idle subscription (10,000)", "value": 4000.0,
         "unit": "B", "sign": "<=", "target": 1024, "loss": None},
    ],
    "stix": {"reference": "threatbus==2022.5.16", "rows": [
        {"workload": "STIX high met", "figure": "deliveries_per_s", "ours": 30.0, "limit": 100.0, "ref": 1.0,
         "ratio": 0.3, "ref_ratio": 0.01, "sign": ">=", "target": 0.25, "loss": 0, "ref_loss": 0},
        {"workload": "STIX high missed", "figure": "deliveries_per_s", "ours": 20.0, "limit": 100.0, "ref": 1.0,
         "ratio": 0.2, "ref_ratio": 0.01, "sign": ">=", "target": 0.25, "loss": 0, "ref_loss": 0},
        {"workload": "STIX low, no target", "figure": "lat_p99_ms", "ours": 9.0, "limit": 1.0, "ref": None,
         "ratio": 9.0, "ref_ratio": None, "sign": "<=", "target": None, "loss": 0, "ref_loss": None},
        {"workload": "STIX failed", "figure": "lat_p99_ms", "ours": None, "limit": 1.0, "ref": 2.0,
         "ratio": None, "ref_ratio": 2.0, "sign": "<=", "target": None, "loss": None, "ref_loss": 0},
    ]},
    "store": [
        {"workload": "store low met", "figure": "lat_p99_ms", "on": 1.4, "off": 1.0, "ratio": 1.4,
         "sign": "<=", "target": 1.5, "loss": 0},
        {"workload": "store low missed", "figure": "lat_p99_ms", "on": 1.6, "off": 1.0, "ratio": 1.6,
         "sign": "<=", "target": 1.5, "loss": 0},
        {"workload": "snapshot met", "figure": "time", "value": 9.99, "unit": "s", "sign": "<",
         "target": 10.0, "loss": 0},
        {"workload": "snapshot missed", "figure": "time", "value": 10.0, "unit": "s", "sign": "<",
         "target": 10.0, "loss": 0},
        {"workload": "snapshot incomplete", "figure": "time", "value": None, "unit": "s", "sign": "<",
         "target": 10.0, "loss": 5},
    ],
}


def met_column(rendered: str) -> dict:
    """Each table row's workload and its last cell, the met column."""
    cells = [line.strip("|").split("|") for line in rendered.splitlines() if line.startswith("| ")]
    return {c[0].strip(): c[-1].strip() for c in cells if c[0].strip() != "workload"}


class READMETable(SynchronousTestCase):
    def test_markers(self):
        """The README has one block for bench/run.py, in its Performance section."""
        with open(README, encoding="utf-8") as f:
            text = f.read()
        self.assertEqual((text.count(run.BEGIN), text.count(run.END)), (1, 1))
        performance = text.index("### Performance")
        self.assertLess(performance, text.index(run.BEGIN))
        self.assertLess(text.index(run.END), text.index("\n#", performance + 1))

    def test_readme_is_rendered(self):
        """The README's block is exactly what render makes of bench/results.json."""
        if not os.path.exists(RESULTS):
            raise SkipTest("bench/results.json does not exist yet: a full run of "
                           "`python bench/run.py` writes it and the README's tables")
        with open(RESULTS, encoding="utf-8") as f:
            results = json.load(f)
        with open(README, encoding="utf-8") as f:
            block = block_of(f.read())
        self.assertEqual(block, run.render(results),
                         "README.md's tables differ from bench/results.json: "
                         "run `python bench/run.py --render` rather than edit them")


class Render(SynchronousTestCase):
    def test_met(self):
        """A row is "yes" when its target is met, "NO" when missed or
        anything was lost, higher and lower being better alike."""
        met = met_column(run.render(RESULTS_FIXTURE))
        self.assertEqual(met, {
            "high met": "yes", "high missed": "NO", "high met but lost": "NO",
            "low met": "yes", "low missed": "NO",
            "memory met": "yes", "memory missed": "NO",
            "STIX high met": "yes", "STIX high missed": "NO",
            "STIX low, no target": "yes", "STIX failed": "NO",
            "store low met": "yes", "store low missed": "NO",
            "snapshot met": "yes", "snapshot missed": "NO", "snapshot incomplete": "NO",
        })

    def test_cells(self):
        """Figures, ratios and targets as the tables show them."""
        rendered = run.render(RESULTS_FIXTURE)
        self.assertIn("| high met | deliveries_per_s | 90.0 | 100.0 | 0.90 | >= 0.75 | 0 | yes |", rendered)
        self.assertIn("| memory missed | RSS per idle subscription (10,000) | 4,000 B |  |  | <= 1024 B |  | NO |",
                      rendered)
        self.assertIn("| STIX failed | lat_p99_ms | failed | 1.0 | 2.0 | failed | 2.00 | - | failed | 0 | NO |",
                      rendered)
        self.assertIn("| snapshot incomplete | time | failed |  |  | < 10 s | 5 | NO |", rendered)
        self.assertIn("2000-01-01: medians of 3 runs each", rendered)

    def test_one_table(self):
        """One table alone renders as that table, without the line of where it ran."""
        rendered = run.render({"store": RESULTS_FIXTURE["store"]})
        self.assertNotIn("medians", rendered)
        self.assertEqual(set(met_column(rendered)), {row["workload"] for row in RESULTS_FIXTURE["store"]})

    def test_results_round_trip(self):
        """The results, written as JSON and read back, render the same."""
        path = self.mktemp()
        run.write_results(path, RESULTS_FIXTURE)
        self.assertEqual(run.render(run.load_results(path)), run.render(RESULTS_FIXTURE))


class WriteReadme(SynchronousTestCase):
    def write(self, text: str, block: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        run.write_readme(path, block)
        with open(path, encoding="utf-8") as f:
            return f.read()

    def test_replaces_only_the_block(self):
        before = "# Title\n\n### Performance\n\nText.\n\n"
        after = "\n### Architecture\n\nMore, with <!-- other --> comments.\n"
        text = before + run.BEGIN + "\nold table\n| a | b |\n" + run.END + "\n" + after
        new = run.render(RESULTS_FIXTURE)
        written = self.write(text, new)
        self.assertEqual(written, before + run.BEGIN + "\n" + new + run.END + "\n" + after)
        self.assertEqual(block_of(written), new)
        self.assertEqual(self.write(written, new), written)  # again: no change

    def test_no_markers(self):
        """Without one pair of markers nothing is written."""
        for text in ["# Title\n", run.BEGIN + "\n", run.END + "\n" + run.BEGIN + "\n",
                     (run.BEGIN + "\n" + run.END + "\n") * 2]:
            path = self.mktemp()
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            self.assertRaises(ValueError, run.write_readme, path, "new\n")
            with open(path, encoding="utf-8") as f:
                self.assertEqual(f.read(), text)
