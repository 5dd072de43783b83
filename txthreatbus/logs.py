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

    def startService(self):
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
        super().startService()

    def stopService(self):
        for observer in self._observers:
            self._publisher.removeObserver(observer)
        self._observers = []
        if self._file is not None:
            self._file.close()
            self._file = None
        self._publisher.addObserver(self._destination)
        return super().stopService()
