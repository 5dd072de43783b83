"""``python -m txthreatbus.store URL``: the store's writer process (see ``writer``)."""

import sys

from txthreatbus.store.writer import main

sys.exit(main(sys.argv))
