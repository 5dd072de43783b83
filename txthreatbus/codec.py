"""
The wire codec: messages to JSON and back, as Threat Bus 2020.11.26 writes them.

``encode`` gives a message's JSON bytes and computes them once per message
object, however many apps receive it. ``decode`` validates everything it
reads and raises ``DecodeError`` (and nothing else) with a message that says
what is wrong.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

from txthreatbus.model import (
    BY_TOPIC,
    Intel,
    IntelData,
    IntelType,
    Message,
    MessageType,
    Operation,
    Sighting,
    SnapshotEnvelope,
    SnapshotRequest,
)


class DecodeError(ValueError):
    """Input that is not a well-formed message; the text says why."""


_MEMO = "_txthreatbus_wire"


def encode(message: Message) -> bytes:
    """The JSON encoding of ``message``, computed at most once per message."""
    memo = vars(message)
    wire = memo.get(_MEMO)
    if wire is None:
        wire = memo[_MEMO] = json.dumps(unstructure(message)).encode("utf-8")
    return wire


def unstructure(message: Message) -> dict:
    """The JSON value of ``message``, as Threat Bus 2020.11.26 encodes it."""
    if isinstance(message, Intel):
        data = dict(message.data.extra)
        data["indicator"] = list(message.data.indicator)
        data["intel_type"] = message.data.intel_type.value
        return {
            "ts": str(message.ts),
            "id": message.id,
            "data": data,
            "operation": message.operation.value,
        }
    if isinstance(message, Sighting):
        return {
            "ts": str(message.ts),
            "intel": message.intel,
            "context": message.context,
            "ioc": None if message.ioc is None else list(message.ioc),
        }
    if isinstance(message, SnapshotRequest):
        return {
            "snapshot_type": message.snapshot_type.value,
            "snapshot_id": message.snapshot_id,
            "snapshot": message.snapshot // timedelta(seconds=1),
        }
    if isinstance(message, SnapshotEnvelope):
        return {
            "snapshot_type": message.snapshot_type.value,
            "snapshot_id": message.snapshot_id,
            "body": unstructure(message.body),
        }
    raise TypeError(f"not a message: {message!r}")


def decode(topic: str, data: bytes) -> Message:
    """
    The message of bus ``topic`` (e.g. ``threatbus/intel``) encoded in
    ``data``; raises ``DecodeError`` if it is not one.
    """
    cls = BY_TOPIC.get(topic)
    if cls is None:
        raise DecodeError(f"unknown topic {topic!r}")
    value = loads(data)
    message = structure(cls, value)
    if is_encoding(message, value):
        # ``data`` already is this message's encoding (as JSON values go):
        # forwarding it as it came saves encoding it again.
        vars(message)[_MEMO] = bytes(data)
    return message


def is_encoding(message: Message, value: dict) -> bool:
    """
    Whether the JSON ``value`` that ``message`` was structured from equals
    ``unstructure(message)``, found cheaply: ``structure`` carries every
    value over unchanged except the timestamp (parsed), a missing or null
    ``context`` (made ``{}``) and keys it does not know (left out).
    """
    if isinstance(message, Intel):
        return value.keys() == _INTEL_KEYS and value["ts"] == str(message.ts)
    if isinstance(message, Sighting):
        return (
            value.keys() == _SIGHTING_KEYS
            and value["context"] is not None
            and value["ts"] == str(message.ts)
        )
    return unstructure(message) == value


_INTEL_KEYS = frozenset(("ts", "id", "data", "operation"))
_SIGHTING_KEYS = frozenset(("ts", "intel", "context", "ioc"))


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# NaN and Infinity are not JSON: we could not encode them back as JSON.
_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def loads(data: bytes) -> object:
    """Parse JSON bytes; any failure is a ``DecodeError``."""
    if not isinstance(data, str):
        # json.loads would also take UTF-16 and UTF-32: the wire is UTF-8.
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("not UTF-8") from None
    try:
        return _DECODER.decode(data)
    except RecursionError:
        raise DecodeError("JSON nested too deeply") from None
    except ValueError as e:
        raise DecodeError(f"invalid JSON: {e}") from None


def structure(cls: type, value: object) -> Message:
    """The message of class ``cls`` that the JSON ``value`` describes."""
    fields = _Fields(value, cls.__name__)
    try:
        return _STRUCTURERS[cls](fields)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(f"{cls.__name__}: {e}") from None


_MISSING = object()


class _Fields:
    """Typed access to the keys of a JSON object, failing with DecodeError."""

    def __init__(self, value: object, what: str):
        if not isinstance(value, dict):
            raise DecodeError(f"{what} must be a JSON object, not {type(value).__name__}")
        self.value = value
        self.what = what

    def get(self, key: str, types: tuple, optional: bool = False):
        # JSON values come in exact types (a bool is no int here)
        v = self.value.get(key, _MISSING)
        if type(v) in types:
            return v
        if optional and (v is None or v is _MISSING):
            return None
        if v is _MISSING:
            raise DecodeError(f"{self.what} has no {key!r}")
        names = " or ".join(t.__name__ for t in types)
        raise DecodeError(f"{self.what}.{key} must be {names}, not {type(v).__name__}")

    def ts(self) -> datetime:
        raw = self.get("ts", (str,))
        try:
            return datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith("Z") else raw)
        except ValueError:
            raise DecodeError(f"{self.what}.ts is not a timestamp: {raw!r}") from None

    def enum(self, key: str, enum_cls: type, types: tuple):
        raw = self.get(key, types)
        try:
            return _MEMBERS[enum_cls][raw]
        except KeyError:
            raise DecodeError(f"{self.what}.{key}: unknown {enum_cls.__name__} {raw!r}") from None


_MEMBERS = {cls: {m.value: m for m in cls} for cls in (IntelType, MessageType, Operation)}


def _intel(f: _Fields) -> Intel:
    data = _Fields(f.get("data", (dict,)), "Intel.data")
    extra = {k: v for k, v in data.value.items() if k not in ("indicator", "intel_type")}
    return Intel(
        ts=f.ts(),
        id=f.get("id", (str,)),
        data=IntelData(
            indicator=tuple(data.get("indicator", (list,))),
            intel_type=data.enum("intel_type", IntelType, (int,)),
            extra=extra,
        ),
        operation=f.enum("operation", Operation, (str,)),
    )


def _sighting(f: _Fields) -> Sighting:
    ioc = f.get("ioc", (list,), optional=True)
    return Sighting(
        ts=f.ts(),
        intel=f.get("intel", (str,)),
        context=f.get("context", (dict,), optional=True) or {},
        ioc=None if ioc is None else tuple(ioc),
    )


def _snapshot_request(f: _Fields) -> SnapshotRequest:
    seconds = f.get("snapshot", (int,))
    try:
        snapshot = timedelta(seconds=seconds)
    except OverflowError:
        snapshot = None
    if snapshot is None or seconds <= 0:
        raise DecodeError(
            f"SnapshotRequest.snapshot must be a number of seconds > 0 that fits a "
            f"duration, not {seconds!r}"
        )
    return SnapshotRequest(
        snapshot_type=f.enum("snapshot_type", MessageType, (int,)),
        snapshot_id=f.get("snapshot_id", (str,)),
        snapshot=snapshot,
    )


def _snapshot_envelope(f: _Fields) -> SnapshotEnvelope:
    snapshot_type = f.enum("snapshot_type", MessageType, (int,))
    body_cls = Intel if snapshot_type is MessageType.INTEL else Sighting
    snapshot_id = f.get("snapshot_id", (str,))
    body = f.get("body", (dict,))
    try:
        body = structure(body_cls, body)
    except DecodeError as e:
        raise DecodeError(
            f"SnapshotEnvelope.body (snapshot_type {snapshot_type.name}): {e}"
        ) from None
    return SnapshotEnvelope(snapshot_type=snapshot_type, snapshot_id=snapshot_id, body=body)


_STRUCTURERS = {
    Intel: _intel,
    Sighting: _sighting,
    SnapshotRequest: _snapshot_request,
    SnapshotEnvelope: _snapshot_envelope,
}
