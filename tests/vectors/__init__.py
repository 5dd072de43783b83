"""The golden vectors: what Threat Bus 2020.11.26 emitted, and its number tables.

``STIX_VECTORS`` holds the same for the STIX-2.1 generation (Threat Bus
2022.5.16), recorded by ``make_stix_vectors.py`` from the upstream packages.
"""

import json
import os

with open(os.path.join(os.path.dirname(__file__), "threatbus-2020.11.26.json"), encoding="utf-8") as f:
    VECTORS = json.load(f)

with open(os.path.join(os.path.dirname(__file__), "stix-2022.5.16.json"), encoding="utf-8") as f:
    STIX_VECTORS = json.load(f)
