"""
Small Deferred helpers: one Deferred's result handed on, and Deferreds
waiting for conditions on an object.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure


def follow(d: Deferred) -> Deferred:
    """A new Deferred with the result of ``d``, leaving ``d``'s own result alone."""
    follower = Deferred()

    def both(result):
        if isinstance(result, Failure):
            follower.errback(result)
        else:
            follower.callback(result)
        return result

    d.addBoth(both)
    return follower


class Waiters:
    """Deferreds waiting for conditions on one object, fired when they come true."""

    def __init__(self):
        self._waiting: List[Tuple[Callable[[], bool], Deferred]] = []

    def wait(self, condition: Callable[[], bool]) -> Deferred:
        """A Deferred that fires once ``condition()`` is true (now, if it is); cancel it to stop waiting."""
        if condition():
            return succeed(None)

        def cancel(d):
            self._waiting[:] = [entry for entry in self._waiting if entry[1] is not d]

        d = Deferred(cancel)
        self._waiting.append((condition, d))
        return d

    def check(self) -> None:
        """Fire the Deferreds whose conditions have come true."""
        if not self._waiting:
            return
        ready = [entry for entry in self._waiting if entry[0]()]
        for entry in ready:
            self._waiting.remove(entry)
        for _, d in ready:
            d.callback(None)

    def fail_all(self, error: Exception) -> None:
        """Fail every waiting Deferred with ``error``."""
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(error)
