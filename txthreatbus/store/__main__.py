"""``TXTHREATBUS_STORE_URL=URL python -m txthreatbus.store``: the store's writer process (see ``writer``)."""

import os
import sys

from txthreatbus.store.writer import main

sys.exit(main(os.environ))
