"""
The store's writer: a process of its own that writes what the bus records.

In a thread of the bus's process, the database driver's work took the
interpreter lock from the reactor for every statement it bound and every
row it stepped: measured, the bus routed a quarter fewer messages a second
with the store on, and its p99 latency grew by 70%. As a process it shares
nothing with the reactor but a pipe.

The protocol on that pipe: the bus writes frames, a 4-byte big-endian
length and a pickled list of ``Record``s as plain tuples (a fifth of the
cost of pickling the named tuples), to the writer's
stdin; the writer writes them in one transaction each and answers each
frame with one line on stdout, ``ok`` or ``error <why>``, in order. At the
end of stdin it writes what it has read and exits. ``WriterProcess`` is the
bus's side. (Only the bus, which started the writer, writes to its stdin:
unpickling it is safe.)

    TXTHREATBUS_STORE_URL=URL python -m txthreatbus.store
"""

from __future__ import annotations

import pickle
import sys
from collections import deque

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txthreatbus import logs
from txthreatbus.store.database import Database, Record

log = Logger(observer=logs.publisher)


class WriteError(Exception):
    """The writer could not write a batch, or is gone; the text says why."""


#: The environment variable that names the writer's database (not an
#: argument: a password in the URL would show in ps).
URL_VARIABLE = "TXTHREATBUS_STORE_URL"


def main(environ) -> int:
    """Write the frames on stdin to the database ``environ`` names, until stdin ends."""
    database = Database(environ[URL_VARIABLE])
    database.open()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        while True:
            header = stdin.read(4)
            if len(header) < 4:
                return 0
            data = stdin.read(int.from_bytes(header, "big"))
            try:
                database.record([Record._make(fields) for fields in pickle.loads(data)])
            except Exception as e:
                answer = b"error " + " ".join(f"{type(e).__name__}: {e}".split()).encode("utf-8", "replace")[:500]
            else:
                answer = b"ok"
            stdout.write(answer + b"\n")
            stdout.flush()
    finally:
        database.close()


class WriterProcess(protocol.ProcessProtocol):
    """
    The bus's side of a writer process: ``write`` sends a batch and gives a
    Deferred of its commit; ``ended`` fires when the process is gone.
    """

    def __init__(self, clock):
        self._waiting: deque = deque()
        self._lines = b""
        self._throttle = logs.Throttle(clock)
        self.ended = Deferred()
        self.gone = False

    def write(self, records) -> Deferred:
        """Write ``records`` (``Record``s) in one transaction: a Deferred of None, or a ``WriteError``."""
        d = Deferred()
        if self.gone:
            d.errback(WriteError("the writer process is gone"))
            return d
        self._waiting.append(d)
        # (Records are tuples: they pickle as such, the writer makes them Records again)
        data = pickle.dumps(list(map(tuple, records)), protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(len(data).to_bytes(4, "big") + data)
        return d

    def close(self) -> Deferred:
        """End the writer once it has written all it was sent: ``ended``."""
        if not self.gone:
            self.transport.closeStdin()
        return self.ended

    def outReceived(self, data: bytes) -> None:
        self._lines += data
        while b"\n" in self._lines:
            line, _, self._lines = self._lines.partition(b"\n")
            if not self._waiting:
                continue
            d = self._waiting.popleft()
            if line == b"ok":
                d.callback(None)
            else:
                d.errback(WriteError(line.removeprefix(b"error ").decode("utf-8", "replace")))

    def errReceived(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace").strip()
        if text:
            self._throttle("stderr", log.error, "The store's writer process said: {text}", text=text[-500:])

    def processEnded(self, reason) -> None:
        self.gone = True
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(WriteError(f"the writer process ended: {reason.getErrorMessage()}"))
        self.ended.callback(None)
