"""
The store as a service of the bus: it records every Intel, Sighting and
STIX object the bus routes, and answers snapshot requests from what it
recorded.

Recording never holds up routing: records wait in a queue on the reactor
and go to the database in batches (every ``FLUSH_INTERVAL`` seconds or
``FLUSH_RECORDS`` records), written by a process of the store's own (see
``writer``); reading (snapshots, counts, pruning) is done in a thread. A
database that fails (disk full, server down), or a writer that dies, is
logged, counted and retried with backoff, the writer started anew;
meanwhile the queue holds up to ``MAX_QUEUED_BYTES``, then drops its
oldest, counted.

Answering is the store's part of a snapshot: for a requester of this
instance (another instance's store answers its own), the live intel or the
sightings received within the window are read a page at a time, each page
handed to the bus as envelopes for that requester only, and the next page
read only once the requester has taken most of the last (so memory stays
flat however large the answer).
"""

from __future__ import annotations

import operator
import os
import sys
from collections import deque
from datetime import timedelta

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from txthreatbus import codec, logs, stix
from txthreatbus.config import safe_url
from txthreatbus.interfaces import IApp
from txthreatbus.model import Intel, MessageType, Operation, Sighting, SnapshotEnvelope
from txthreatbus.store.database import Database, Record
from txthreatbus.store.writer import URL_VARIABLE, WriterProcess

log = Logger(observer=logs.publisher)

#: Seconds between writes of what was routed: at most this much (and a
#: write's time) is lost when the process is killed.
FLUSH_INTERVAL = 0.05
#: Records written in one transaction at most.
FLUSH_RECORDS = 2000
#: Bytes of records waiting for a database that is down, at most.
MAX_QUEUED_BYTES = 64 << 20
#: Seconds before retrying a failed write, doubled to ``MAX_RETRY_DELAY``.
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0
#: Rows read a page; a page's envelopes go out before the next is read.
PAGE = 500
#: Bytes a requester may hold unsent before the next page waits.
PACE_BYTES = 1 << 20
#: Seconds between looks at a requester that holds too much.
PACE_INTERVAL = 0.01
#: Seconds the writer may take to write what it holds when the bus stops.
STOP_TIMEOUT = 10.0
#: Seconds between refreshes of the record counts, and between prunes.
COUNT_INTERVAL = 30.0
PRUNE_INTERVAL = 3600.0

_BODY = operator.attrgetter("body")

#: The bus topic of each kind of record.
_KINDS = {cls.kind: cls.topic for cls in (Intel, Sighting, stix.Indicator, stix.Sighting)}


def record_of(message, received: float) -> Record:
    """The store's record of an Intel, Sighting or STIX object received at ``received``."""
    body = codec.encode(message)
    if isinstance(message, Intel):
        return Record(message.kind, received, body, message.id, message.operation is Operation.REMOVE)
    if isinstance(message, stix.Indicator):
        return Record(message.kind, received, body, message.id, message.removes)
    return Record(message.kind, received, body)


@implementer(IApp)
class StoreService(Service):
    """
    The store of one bus, in the database ``database``.

    @param retention: seconds records are kept; 0 keeps them all.
    """

    name = "store"

    def __init__(self, database: Database, bus, clock, retention: float = 0.0):
        self.database = database
        self._bus = bus
        self._clock = clock
        self._retention = retention
        self._metrics = bus.metrics
        self._throttle = logs.Throttle(clock)
        self._pool = ThreadPool(1, 1, "txthreatbus-store")
        self._queue: deque = deque()
        self._queued_bytes = 0
        #: The write on its way to the database, if any: one at a time.
        self._in_flight: Deferred = None
        self._flush_call = None
        self._retry_delay = 0.0
        self._loops = []
        self._opened: Deferred = None
        self._writer: WriterProcess = None
        self._retry_open = None
        #: Whether the database is open; the record counts by kind, as last counted.
        self._open_now = False
        self._counts = None

    # --- lifecycle

    def startService(self):
        super().startService()
        self._pool.start()
        self._bus.watch(self._record)
        self._open()

    def _started(self, _):
        if not self.running:
            return
        self._open_now = True
        log.info("Store open: {url}", url=safe_url(self.database.url))
        for interval, work in ((COUNT_INTERVAL, self._count), (PRUNE_INTERVAL, self._prune)):
            loop = LoopingCall(work)
            loop.clock = self._clock
            loop.start(interval).addErrback(lambda f: log.failure("Store upkeep failed", f))
            self._loops.append(loop)
        self._schedule_flush(0)

    def _failed_to_open(self, failure):
        self._metrics.store_failures.labels("open").inc()
        self._throttle(
            "open_failed",
            log.error,
            "The store cannot open {url} ({error}); retrying every {delay:g} s",
            url=safe_url(self.database.url),
            error=failure.getErrorMessage(),
            delay=MAX_RETRY_DELAY,
        )
        if not self.running:
            return
        self._retry_open = self._clock.callLater(MAX_RETRY_DELAY, self._open)

    def _open(self):
        self._opened = self._in_thread(self.database.open)
        self._opened.addCallbacks(self._started, self._failed_to_open)

    async def _stop(self):
        self._open_now = False
        if self._retry_open is not None and self._retry_open.active():
            self._retry_open.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        if self._in_flight is not None:
            await self._in_flight  # never fails: _write_failed handles it
        try:
            while self._queue:
                await self._write(self._take())
        except Exception:
            log.failure("The store lost {n} records at stop", n=len(self._queue))
        if self._writer is not None:
            writer, self._writer = self._writer, None
            ended = writer.close()
            timer = self._clock.callLater(STOP_TIMEOUT, writer.transport.signalProcess, "KILL")
            await ended
            if timer.active():
                timer.cancel()
        await self._in_thread(self.database.close)
        self._pool.stop()

    def stopService(self):
        super().stopService()
        self._bus.unwatch(self._record)
        d = ensureDeferred(self._stop())
        return d.addErrback(lambda f: log.failure("Stopping the store failed", f))

    def _in_thread(self, f, *args) -> Deferred:
        return deferToThreadPool(self._clock, self._pool, f, *args)

    def _spawn_writer(self) -> WriterProcess:
        writer = WriterProcess(self._clock)
        # the URL in the environment, not in argv: a password in it stays
        # out of what other users see in ps
        env = {**os.environ, URL_VARIABLE: self.database.url}
        self._clock.spawnProcess(writer, sys.executable, [sys.executable, "-m", "txthreatbus.store"], env=env)
        self._writer = writer
        return writer

    def status(self) -> dict:
        """
        What the status page shows of the store: its URL without password,
        its state, the records it held when last counted (every
        ``COUNT_INTERVAL``; None before), and what waits to be written.
        """
        if not self.running:
            state = "stopped"
        elif self._retry_open is not None and self._retry_open.active():
            state = "cannot open, retrying"
        elif not self._open_now:
            state = "opening"
        elif self._retry_delay:
            state = "writes failing, retrying"
        else:
            state = "open"
        return {
            "url": safe_url(self.database.url),
            "state": state,
            "records": None if self._counts is None else dict(self._counts),
            "queue": {"records": len(self._queue), "bytes": self._queued_bytes},
        }

    # --- recording

    def _record(self, message) -> None:
        record = record_of(message, self._clock.seconds())
        self._queue.append(record)
        self._queued_bytes += len(record.body)
        while self._queued_bytes > MAX_QUEUED_BYTES:
            dropped = self._queue.popleft()
            self._queued_bytes -= len(dropped.body)
            self._metrics.drop("store_overflow")
        if len(self._queue) == FLUSH_RECORDS:
            # a batch's worth: written now, or as soon as the write in
            # flight is done (_written looks again)
            self._schedule_flush(0)

    def _schedule_flush(self, delay: float) -> None:
        if self._flush_call is not None and self._flush_call.active():
            if self._flush_call.getTime() <= self._clock.seconds() + delay:
                return
            self._flush_call.cancel()
        self._flush_call = self._clock.callLater(delay, self._flush)

    def _take(self) -> list:
        queue = self._queue
        if len(queue) <= FLUSH_RECORDS:
            batch = list(queue)
            queue.clear()
        else:
            batch = [queue.popleft() for _ in range(FLUSH_RECORDS)]
        self._queued_bytes -= sum(map(len, map(_BODY, batch)))
        return batch

    def _flush(self) -> None:
        self._flush_call = None
        if self._in_flight is not None or not self.running:
            return
        if not self._queue:
            self._schedule_flush(FLUSH_INTERVAL)
            return
        batch = self._take()
        # set before the callbacks, which clear it, even on a write that ends at once
        self._in_flight = self._write(batch)
        self._in_flight.addCallbacks(self._written, self._write_failed, errbackArgs=(batch,))

    def _write(self, batch) -> Deferred:
        started = self._clock.seconds()
        writer = self._writer
        if writer is None or writer.gone:
            writer = self._spawn_writer()

        def done(_):
            self._metrics.store_writes.inc()
            self._metrics.store_write_seconds.inc(self._clock.seconds() - started)

        return writer.write(batch).addCallback(done)

    def _written(self, _):
        self._in_flight = None
        self._retry_delay = 0.0
        if self.running:  # (when stopping, _stop writes what is left)
            self._schedule_flush(0 if len(self._queue) >= FLUSH_RECORDS else FLUSH_INTERVAL)

    def _write_failed(self, failure, batch):
        self._in_flight = None
        self._metrics.store_failures.labels("write").inc()
        self._throttle(
            "write_failed",
            log.error,
            "The store cannot write {n} records ({error}); retrying",
            n=len(batch),
            error=failure.getErrorMessage(),
        )
        # back to the front of the queue, in order, for the retry
        self._queue.extendleft(reversed(batch))
        self._queued_bytes += sum(len(r.body) for r in batch)
        self._retry_delay = min(MAX_RETRY_DELAY, max(FIRST_RETRY_DELAY, self._retry_delay * 2))
        if self.running:
            self._schedule_flush(self._retry_delay)

    # --- upkeep

    def _count(self) -> Deferred:
        def publish(counts):
            self._counts = {kind: counts.get(kind, 0) for kind in _KINDS}
            for kind in _KINDS:
                self._metrics.store_records.labels(kind).value = counts.get(kind, 0)

        return self._in_thread(self.database.counts).addCallbacks(publish, self._upkeep_failed, errbackArgs=("count",))

    def _prune(self) -> Deferred:
        if not self._retention:
            return succeed(None)
        before = self._clock.seconds() - self._retention

        def pruned(n):
            if n:
                log.info("Store pruned {n} records received more than {days:g} days ago", n=n, days=self._retention / 86400)

        return self._in_thread(self.database.prune, before).addCallbacks(
            pruned, self._upkeep_failed, errbackArgs=("prune",)
        )

    def _upkeep_failed(self, failure, operation: str):
        self._metrics.store_failures.labels(operation).inc()
        self._throttle(operation, log.error, "The store could not {operation}: {error}", operation=operation, error=failure.getErrorMessage())

    # --- IApp: answering snapshots

    def snapshot(self, request, requester):
        if requester is None or not self.running:
            return succeed(None)  # another instance's requester: its own store answers
        d = ensureDeferred(self._answer(request, requester))
        d.addErrback(self._answer_failed, request)
        return succeed(None)

    async def _answer(self, request, requester) -> None:
        await self._opened
        since = self._clock.seconds() - request.snapshot / timedelta(seconds=1)
        read = self.database.live_intel if request.snapshot_type is MessageType.INTEL else self.database.sightings_since
        after, answered = None, 0
        while self._bus.snapshot_open(request.snapshot_id):
            rows = await self._in_thread(read, since, after, PAGE)
            for key, kind, body in rows:
                try:
                    item = codec.decode(_KINDS[kind], body)
                except codec.DecodeError as e:
                    self._metrics.drop("store_undecodable")
                    self._throttle("undecodable", log.error, "The store holds an undecodable {kind}: {error}", kind=kind, error=str(e))
                    continue
                self._bus.deliver(SnapshotEnvelope(request.snapshot_type, request.snapshot_id, item))
                answered += 1
            if len(rows) < PAGE:
                break
            after = rows[-1][0]
            while getattr(requester, "pending_bytes", 0) > PACE_BYTES and self._bus.snapshot_open(request.snapshot_id):
                await deferLater(self._clock, PACE_INTERVAL, lambda: None)
        self._throttle(
            "answered",
            log.info,
            "Store answered snapshot {id} with {n} {type} items",
            id=request.snapshot_id,
            n=answered,
            type=request.snapshot_type.name,
        )

    def _answer_failed(self, failure, request):
        self._metrics.store_failures.labels("read").inc()
        self._throttle(
            "read_failed",
            log.error,
            "The store could not answer snapshot {id}: {error}",
            id=request.snapshot_id,
            error=failure.getErrorMessage(),
        )
