#!/usr/bin/env python3
"""
What checking a STIX pattern costs, in process: the point-equality fast path
against OASIS's stix2-patterns parser (what every other pattern goes
through), and a whole Indicator's decoding of each kind, back to back.

    python bench/patterns.py [--number 2000]
"""

from __future__ import annotations

import argparse
import json
import timeit

from txthreatbus import codec, patterns

PATTERNS = {
    "point equality (fast path)": "[domain-name:value = 'evil.example.com']",
    "point equality, hash (fast path)": "[file:hashes.'SHA-256' = '" + "ab" * 32 + "']",
    "two observations (parser)": "[domain-name:value = 'evil.example.com'] AND [ipv4-addr:value = '203.0.113.1']",
    "qualified (parser)": "[ipv4-addr:value = '203.0.113.1'] REPEATS 5 TIMES WITHIN 300 SECONDS",
}


def indicator(pattern: str) -> bytes:
    return json.dumps(
        {
            "type": "indicator",
            "spec_version": "2.1",
            "id": "indicator--6911104f-c504-4086-a15b-05e28cf73435",
            "created": "2022-05-16T10:00:00.000Z",
            "modified": "2022-05-16T10:00:00.000Z",
            "pattern": pattern,
            "pattern_type": "stix",
            "valid_from": "2022-05-16T10:00:00Z",
        }
    ).encode()


def per_call_us(function, number: int) -> float:
    function()  # the first call loads the library
    return min(timeit.repeat(function, number=number, repeat=3)) / number * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args()
    print(f"{'pattern':<34} {'validate us':>12} {'decode Indicator us':>20} {'Indicators/s (decode)':>22}")
    for name, pattern in PATTERNS.items():
        validate = per_call_us(lambda: patterns.validate(pattern), args.number)
        data = indicator(pattern)
        decode = per_call_us(lambda: codec.decode_stix(data), args.number)
        print(f"{name:<34} {validate:>12.1f} {decode:>20.1f} {1e6 / decode:>22,.0f}")


if __name__ == "__main__":
    main()
