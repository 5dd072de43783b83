"""
The input of ``publish``: a file or stdin, read a chunk at a time without
blocking the reactor (``ChunkReader``), cut into lines (``LineReader``).
"""

from __future__ import annotations

import os
import stat
import sys
from typing import List, Optional

from twisted.internet.defer import Deferred, fail, succeed


class ChunkReader:
    """
    Reads a binary stream a chunk each time it is asked, without a thread:
    a regular file directly (reading it never waits), anything else (a pipe,
    a terminal) in non-blocking mode when the reactor says its descriptor is
    readable. Neither the reactor nor the interpreter's exit ever waits for
    a read; ``close`` puts the descriptor back as it was.
    """

    def __init__(self, stream, reactor, size: int = 1 << 16):
        self._fd = stream.fileno()
        self._reactor = reactor
        self._size = size
        self._waiting: Optional[Deferred] = None
        self._blocking = os.get_blocking(self._fd)
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        if not self._regular:
            os.set_blocking(self._fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "ChunkReader"

    def read(self) -> Deferred:
        """A Deferred of the next chunk of bytes; ``b""`` at the end."""
        try:
            return succeed(os.read(self._fd, self._size))
        except BlockingIOError:
            self._waiting = Deferred()
            self._reactor.addReader(self)
            return self._waiting
        except OSError as e:
            return fail(e)

    def doRead(self) -> None:
        """The reactor's call: the descriptor is readable."""
        self._reactor.removeReader(self)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self.read().chainDeferred(waiting)

    def connectionLost(self, reason) -> None:
        self.doRead()

    def close(self) -> None:
        if self._waiting is not None:
            self._reactor.removeReader(self)
            self._waiting = None
        if not self._regular:
            os.set_blocking(self._fd, self._blocking)


class LineReader:
    """The lines of a ``ChunkReader``, a batch at a time."""

    def __init__(self, chunks: ChunkReader):
        self._chunks = chunks
        self._tail = b""
        self._ended = False
        self.position = 0

    async def lines(self) -> Optional[List[bytes]]:
        """The next complete lines; None at the end."""
        while not self._ended:
            data = await self._chunks.read()
            if not data:
                self._ended = True
                tail, self._tail = self._tail, b""
                return [tail] if tail else None
            self.position += len(data)
            lines = (self._tail + data).split(b"\n")
            self._tail = lines.pop()
            if lines:
                return lines
        return None


def open_input(path: str):
    """The binary stream to read, and its name for people: ``-`` is stdin."""
    if path == "-":
        return sys.stdin.buffer, "stdin"
    return open(path, "rb"), path


def regular_file_size(stream) -> int:
    """The size of ``stream`` if it is a regular file, else 0."""
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0
