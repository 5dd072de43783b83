"""
The intel store: the bus remembers what it routes and answers snapshots
from it (``StoreService``), in SQLite or PostgreSQL (``Database``).
"""

from txthreatbus.store.database import Database
from txthreatbus.store.service import StoreService

__all__ = ["Database", "StoreService"]
