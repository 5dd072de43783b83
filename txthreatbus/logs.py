"""
Where txthreatbus's log events go.

Every module logs through ``Logger(observer=logs.publisher)``. By default
``publisher`` forwards everything to Twisted's global log (what twistd and
trial read). ``LoggingService`` applies the ``logging:`` config while it runs:
console events at ``console_verbosity`` and above go on to the global log,
and with ``file: true`` events at ``file_verbosity`` and above are also
written to ``filename``. Twisted's own events are left to twistd.
"""

from __future__ import annotations

import io

from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    globalLogPublisher,
    textFileLogObserver,
)

publisher = LogPublisher(globalLogPublisher)


def _level(name: str) -> LogLevel:
    name = name.lower()
    return LogLevel.levelWithName("warn" if name == "warning" else name)


def _filtered(observer, level_name: str):
    return FilteringLogObserver(
        observer, [LogLevelFilterPredicate(defaultLogLevel=_level(level_name))]
    )


class LoggingService(Service):
    """Routes txthreatbus's events as the ``logging:`` config says, while running."""

    name = "logging"

    def __init__(self, config, publisher=publisher, destination=globalLogPublisher):
        self._config = config
        self._publisher = publisher
        self._destination = destination
        self._observers = []
        self._file = None
        self._routing = False

    def privilegedStartService(self):
        # Before the other services start: what they say then (where they
        # listen) goes where the config says too.
        if self._routing:
            return
        self._routing = True
        config = self._config
        if config.file:
            # Opened here, before the reactor runs: a bad path aborts start-up.
            self._file = io.open(config.filename, "a", encoding="utf-8")
            self._observers.append(_filtered(textFileLogObserver(self._file), config.file_verbosity))
        if config.console:
            self._observers.append(_filtered(self._destination, config.console_verbosity))
        self._publisher.removeObserver(self._destination)
        for observer in self._observers:
            self._publisher.addObserver(observer)
        super().privilegedStartService()

    def startService(self):
        self.privilegedStartService()
        super().startService()

    def stopService(self):
        for observer in self._observers:
            self._publisher.removeObserver(observer)
        self._observers = []
        self._routing = False
        if self._file is not None:
            self._file.close()
            self._file = None
        self._publisher.addObserver(self._destination)
        return super().stopService()


class Throttle:
    """
    Logs the events of one kind at most once every ``interval`` seconds:
    for what a flood of bad input would otherwise repeat, once per message.
    The first event of each key is logged; those that follow within the
    interval are only counted, and the next event logged says how many.
    Long field values are cut (``short``).
    """

    def __init__(self, clock, interval: float = 10.0):
        self._clock = clock
        self._interval = interval
        self._quiet_until = {}  # key -> when the next event may be logged
        self._held = {}  # key -> events not logged since the last one

    def __call__(self, key, emit, format: str, **fields) -> None:
        """Log ``format`` with ``emit`` (e.g. ``log.warn``), unless ``key`` was just logged."""
        now = self._clock.seconds()
        if now < self._quiet_until.get(key, now):
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._quiet_until[key] = now + self._interval
        held = self._held.pop(key, 0)
        if held:
            format += " ({held} more like it in the last {interval} s were counted, not logged)"
        fields = {key: short(value) for key, value in fields.items()}
        emit(format, held=held, interval=self._interval, **fields)


def short(value, limit: int = 200):
    """
    ``value`` for a log line that a peer may fill: a string cut to ``limit``
    characters, a list or dict as its cut ``repr``.
    """
    if isinstance(value, (list, dict)):
        value = repr(value)
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return value[:limit] + ("..." if isinstance(value, str) else b"...")
    return value
