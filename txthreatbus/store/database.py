"""
The store's database, SQLite or PostgreSQL through SQLAlchemy Core: its
schema and migrations, writing records, and reading snapshots a page at a
time. Everything here blocks: ``StoreService`` calls it from its own thread,
never from the reactor's.

Two tables. ``intel`` holds the latest record of each Intel or Indicator id
(an upsert per record: a REMOVE replaces the ADD before it), so the live set
is one indexed query. ``sightings`` holds every Sighting, once: a digest of
its bytes is unique, so that instances sharing one PostgreSQL database,
which all record what they route, record it once.
"""

from __future__ import annotations

import functools
import hashlib
from itertools import chain
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import sqlalchemy as sa

#: Seconds a connection to PostgreSQL may take.
CONNECT_TIMEOUT = 10

#: Rows written by one SQLite statement at most (5 values each; it takes
#: 32,766 parameters a statement).
ROWS_PER_STATEMENT = 500

#: The schema version this code reads and writes.
SCHEMA_VERSION = 1

# An arbitrary key for PostgreSQL's advisory lock: instances starting at
# once migrate one after the other.
_MIGRATION_LOCK = 0x7478_7462  # "txtb"


class Record(NamedTuple):
    """
    One Intel, Indicator or Sighting as the store keeps it. A named tuple,
    not an attrs class: one is made for every message the bus routes, and
    pickled to the writer process, and a tuple is the cheapest at both.
    """

    kind: str  # a message class's kind: intel, indicator, sighting, stix_sighting
    received: float  # when the bus received it, in seconds since the epoch
    body: bytes  # its wire JSON
    item_id: Optional[str] = None  # the Intel or Indicator id; None for sightings
    removes: bool = False  # an Intel REMOVE, or an Indicator with x_threatbus_update REMOVE


#: A page's position: the last row's key, the next page starts after it.
Key = Tuple


metadata = sa.MetaData()

schema_version = sa.Table("txthreatbus_schema", metadata, sa.Column("version", sa.Integer, nullable=False))

intel = sa.Table(
    "txthreatbus_intel",
    metadata,
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("item_id", sa.Text, primary_key=True),
    sa.Column("received", sa.Float, nullable=False),
    sa.Column("removes", sa.Boolean, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Index("txthreatbus_intel_live", "removes", "received", "kind", "item_id"),
)

sightings = sa.Table(
    "txthreatbus_sightings",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("received", sa.Float, nullable=False),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Index("txthreatbus_sightings_received", "received"),
)


def _create_v1(connection) -> None:
    metadata.create_all(connection, tables=[intel, sightings])


#: Migrations by the version they lead to, applied in order.
MIGRATIONS = {1: _create_v1}


class SchemaError(Exception):
    """The database holds a schema this version of txthreatbus cannot use."""


def engine_url(url: str) -> str:
    """``url`` with the driver the store uses: psycopg 3 for PostgreSQL."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + rest
    return url


class Database:
    """The store's tables in the database at ``url`` (SQLAlchemy's form)."""

    def __init__(self, url: str):
        self.url = url
        self._engine: Optional[sa.Engine] = None

    # --- lifecycle

    def open(self) -> None:
        """Connect, and create or migrate the schema."""
        self.close()  # a failed open's engine, if any
        url = engine_url(self.url)
        # a server that does not answer is a failure to retry, not a hang
        connect_args = {"connect_timeout": CONNECT_TIMEOUT} if url.startswith("postgresql") else {}
        engine = sa.create_engine(url, connect_args=connect_args)
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        self._engine = engine
        # Plain SQL: SQLAlchemy's statement building would cost as much again
        # as the database's own work a row. For SQLite, many rows a
        # statement: its executemany takes the interpreter lock back after
        # every row, from the reactor's thread.
        p = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._upsert_intel = _statements(
            f"INSERT INTO {intel.name} (kind, item_id, received, removes, body) VALUES ",
            f"({p}, {p}, {p}, {p}, {p})",
            " ON CONFLICT (kind, item_id) DO UPDATE SET "
            "received = excluded.received, removes = excluded.removes, body = excluded.body",
        )
        self._insert_sighting = _statements(
            f"INSERT INTO {sightings.name} (kind, received, digest, body) VALUES ",
            f"({p}, {p}, {p}, {p})",
            " ON CONFLICT (digest) DO NOTHING",
        )
        self.migrate()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    def migrate(self) -> int:
        """Bring the schema to ``SCHEMA_VERSION``; the version it was at."""
        with self._engine.begin() as connection:
            if self.dialect == "postgresql":
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
            metadata.create_all(connection, tables=[schema_version])
            found = connection.execute(sa.select(schema_version.c.version)).scalar()
            if found is None:
                connection.execute(schema_version.insert().values(version=0))
                found = 0
            if found > SCHEMA_VERSION:
                raise SchemaError(
                    f"the store's schema is version {found}, newer than this txthreatbus "
                    f"knows ({SCHEMA_VERSION}): upgrade txthreatbus, or use another database"
                )
            for version in range(found + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version](connection)
                connection.execute(schema_version.update().values(version=version))
            return found

    # --- writing

    def record(self, records: Sequence[Record]) -> None:
        """Write ``records``, in order, in one transaction."""
        intel_rows, sighting_rows = {}, []
        for r in records:
            if r.item_id is None:
                digest = hashlib.sha256(r.kind.encode() + b" " + r.body).digest()
                sighting_rows.append((r.kind, r.received, digest, r.body))
            else:
                # one id twice in a batch: the later record wins, as row by row
                intel_rows[r.kind, r.item_id] = (r.kind, r.item_id, r.received, r.removes, r.body)
        with self._engine.begin() as connection:
            for statement, rows in ((self._upsert_intel, list(intel_rows.values())), (self._insert_sighting, sighting_rows)):
                if not rows:
                    continue
                if self.dialect != "sqlite":  # psycopg pipelines an executemany
                    connection.exec_driver_sql(statement(1), rows)
                    continue
                for start in range(0, len(rows), ROWS_PER_STATEMENT):
                    chunk = rows[start : start + ROWS_PER_STATEMENT]
                    connection.exec_driver_sql(statement(len(chunk)), tuple(chain.from_iterable(chunk)))

    def prune(self, before: float) -> int:
        """Delete what was received before ``before``; how many rows."""
        with self._engine.begin() as connection:
            gone = connection.execute(intel.delete().where(intel.c.received < before)).rowcount
            gone += connection.execute(sightings.delete().where(sightings.c.received < before)).rowcount
        return gone

    # --- reading

    def live_intel(self, since: float, after: Optional[Key], limit: int) -> List[Tuple[Key, str, bytes]]:
        """
        A page of the live set: the latest record of each id that is no
        REMOVE, received at ``since`` or later, in receipt order, after the
        key ``after``. Rows are ``(key, kind, body)``.
        """
        order = (intel.c.received, intel.c.kind, intel.c.item_id)
        query = (
            sa.select(*order, intel.c.body)
            .where(intel.c.removes.is_(False), intel.c.received >= since)
            .order_by(*order)
            .limit(limit)
        )
        if after is not None:
            query = query.where(sa.tuple_(*order) > sa.tuple_(*after))
        with self._engine.connect() as connection:
            return [((r[0], r[1], r[2]), r[1], r[3]) for r in connection.execute(query)]

    def sightings_since(self, since: float, after: Optional[Key], limit: int) -> List[Tuple[Key, str, bytes]]:
        """A page of the sightings received at ``since`` or later, in receipt order."""
        query = (
            sa.select(sightings.c.seq, sightings.c.kind, sightings.c.body)
            .where(sightings.c.received >= since)
            .order_by(sightings.c.seq)
            .limit(limit)
        )
        if after is not None:
            query = query.where(sightings.c.seq > after[0])
        with self._engine.connect() as connection:
            return [((r[0],), r[1], r[2]) for r in connection.execute(query)]

    def counts(self) -> Dict[str, int]:
        """How many records of each kind the store holds."""
        result: Dict[str, int] = {}
        with self._engine.connect() as connection:
            for table in (intel, sightings):
                query = sa.select(table.c.kind, sa.func.count()).group_by(table.c.kind)
                result.update({kind: n for kind, n in connection.execute(query)})
        return result


def _statements(head: str, row: str, tail: str):
    """The SQL of ``n`` rows, made once for each ``n`` (the same ON CONFLICT clauses in SQLite and PostgreSQL)."""

    @functools.lru_cache(maxsize=8)
    def sql(n: int) -> str:
        return head + ", ".join([row] * n) + tail

    return sql


def _sqlite_pragmas(connection, record) -> None:
    # WAL: readers do not block the writer; synchronous NORMAL: a commit
    # survives the process being killed (not a power cut, which costs the
    # last commits but never the database)
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
