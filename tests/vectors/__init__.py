"""The golden vectors: what Threat Bus 2020.11.26 emitted, and its number tables."""

import json
import os

with open(os.path.join(os.path.dirname(__file__), "threatbus-2020.11.26.json"), encoding="utf-8") as f:
    VECTORS = json.load(f)
