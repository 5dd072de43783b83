"""``python -m txthreatbus.cli``: the ``txthreatbus`` command."""

from txthreatbus.cli import main

main()
