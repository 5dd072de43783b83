"""txthreatbus: the Threat Bus pub/sub layer for threat intelligence, on Twisted."""

__version__ = "0.1.0"
