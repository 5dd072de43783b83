"""
What the command line shows: messages as lines for people (``describe``)
or as JSON lines (``as_json``) on stdout; on stderr, the progress bar, the
log events for people, and error lines.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogLevel,
    PredicateResult,
    eventAsText,
    globalLogBeginner,
)

from txthreatbus import codec, stix
from txthreatbus.model import Intel, MessageType, Sighting, SnapshotRequest


# --- messages


def describe(message) -> str:
    """One line for people about ``message``."""
    if isinstance(message, Intel):
        data = message.data
        extra = f"  {json.dumps(data.extra, sort_keys=True)}" if data.extra else ""
        return (
            f"{message.ts}  intel     {message.operation.value:<6} {data.intel_type.name} "
            f"{' '.join(data.indicator)}  (id {message.id}){extra}"
        )
    if isinstance(message, Sighting):
        ioc = " ".join(message.ioc) if message.ioc else "-"
        context = f"  {json.dumps(message.context, sort_keys=True)}" if message.context else ""
        return f"{message.ts}  sighting  {ioc}  (intel {message.intel}){context}"
    if isinstance(message, stix.Indicator):
        remove = "  REMOVE" if message.removes else ""
        when = message.created or message.valid_from or "-"
        return f"{when}  indicator  {message.pattern_type}: {message.pattern}  ({message.id}){remove}"
    if isinstance(message, stix.Sighting):
        when = message.last_seen or message.created or "-"
        value = message.properties.get("x_threatbus_indicator_value", "-")
        return f"{when}  sighting  {value}  (of {message.sighting_of_ref})"
    if isinstance(message, SnapshotRequest):
        seconds = int(message.snapshot.total_seconds())
        span = f"{seconds // 86400} days" if seconds % 86400 == 0 else f"{seconds} s"
        return (
            f"snapshot request: {MessageType(message.snapshot_type).name} items of the last {span}"
            f"  (snapshot {message.snapshot_id})"
        )
    return repr(message)


def as_json(message) -> str:
    """``message`` as one JSON line: its protocol JSON, with its type (a STIX object has its own)."""
    if isinstance(message, stix.StixObject):
        return codec.encode(message).decode("utf-8")
    return json.dumps({"type": message.kind, **codec.unstructure(message)})


# --- progress


class Progress:
    """A one-line progress bar on a terminal, redrawn at most every 0.1 s."""

    WIDTH = 30

    def __init__(self, stream, total: int, now=time.monotonic):
        self._stream = stream
        self._total = total
        self._now = now
        self._last = 0.0

    def update(self, done: int, published: int, skipped: int, force: bool = False) -> None:
        if not force and self._now() - self._last < 0.1:
            return
        self._last = self._now()
        fraction = min(1.0, done / self._total) if self._total else 1.0
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._stream.write(f"\r[{bar}] {fraction:4.0%}  {published} published, {skipped} skipped")
        self._stream.flush()

    def clear(self) -> None:
        self._stream.write("\r\x1b[K")
        self._stream.flush()


class Silent:
    """No progress bar: what ``publish`` updates when it shows none."""

    def update(self, *args, **kwargs):
        pass

    def clear(self):
        pass


# --- logs and errors for people


class _LevelPredicate:
    """txthreatbus's own events from ``level`` up, everyone else's from warn up."""

    def __init__(self, level: LogLevel):
        self.level = level

    def __call__(self, event) -> PredicateResult:
        level = event.get("log_level", LogLevel.info)
        ours = str(event.get("log_namespace", "")).startswith("txthreatbus")
        return (
            PredicateResult.yes
            if level >= (self.level if ours else LogLevel.warn)
            else PredicateResult.no
        )


def _format(event) -> Optional[str]:
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=False)
    level = event.get("log_level")
    if level in (LogLevel.error, LogLevel.critical):
        text = "error: " + text
    elif level is LogLevel.warn:
        text = "warning: " + text
    return f"txthreatbus: {text}\n"


def log_to_stderr(level: LogLevel) -> None:
    """Log events for people to stderr: txthreatbus's own from ``level`` up."""
    observer = FilteringLogObserver(FileLogObserver(sys.stderr, _format), [_LevelPredicate(level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def error(command: str, text: str) -> None:
    """Tell people on stderr what went wrong in ``command``."""
    sys.stderr.write(f"txthreatbus {command}: {text}\n")
    sys.stderr.flush()


def unreachable(args) -> str:
    """What to say when the bus at ``args.endpoint`` does not answer."""
    return (
        f"no answer from Threat Bus at {args.endpoint} within {args.timeout:g} s (is it running?)"
    )
