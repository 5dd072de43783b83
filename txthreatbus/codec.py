"""
The wire codec: messages to JSON and back, as Threat Bus writes them: 2020
messages as 2020.11.26 does, STIX objects and 2022 snapshot messages as
2022.5.16 does.

``encode`` gives a message's JSON bytes and computes them once per message
object, however many apps receive it. ``decode`` validates everything it
reads and raises ``DecodeError`` (and nothing else) with a message that says
what is wrong. A STIX object keeps the bytes it came in, and is forwarded
exactly as its app sent it (one that came in an envelope, as an equal JSON
value).

Validation is compiled: each 2020 message's wire shape is a msgspec Struct
made of the model's own field rules (``txthreatbus.model``), and the frozen
attrs values are built from what it checked without checking it again
(``model.trusted``). A message in its plain shape (no key twice, none
unknown, no extra data, no escapes) is decoded by msgspec straight from its
bytes; anything else takes the general path, which parses the JSON with the
bus's own limits (duplicate keys, depth, numbers) and then checks the value
against the same Structs, so both paths apply the same rules.
"""

from __future__ import annotations

import json
import math
import re
import typing
from datetime import datetime, timedelta
from itertools import accumulate
from typing import Any, Literal, Optional, Union

import attrs
import msgspec

from txthreatbus import stix
from txthreatbus.model import (
    BY_TOPIC,
    Indicators,
    Intel,
    IntelData,
    IntelType,
    JsonObject,
    Message,
    MessageType,
    Operation,
    Sighting,
    SnapshotEnvelope,
    SnapshotRequest,
    Strings,
    Text,
    WireSeconds,
    trusted,
)


class DecodeError(ValueError):
    """
    Input that is not a well-formed message; the text says why, and
    ``reason``, a short label to count drops by, says which kind:
    ``"duplicate_key"`` (a JSON object names a key twice), ``"too_deep"``
    (nested deeper than ``MAX_DEPTH``), ``"stix_<reason>"`` (not a STIX
    object the bus carries, see ``stix.StixError``) or ``"malformed"``
    (anything else).
    """

    def __init__(self, message: str, *, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


_MEMO = "_txthreatbus_wire"
_MEMO_2022 = "_txthreatbus_wire_2022"


def encode(message: Message) -> bytes:
    """The JSON encoding of ``message``, computed at most once per message."""
    memo = vars(message)
    wire = memo.get(_MEMO)
    if wire is None:
        wire = memo[_MEMO] = json.dumps(unstructure(message)).encode("utf-8")
    return wire


def encode_2022_request(request: SnapshotRequest) -> bytes:
    """
    The JSON encoding of ``request`` for apps of the STIX-2 generation:
    with ``"type": "snapshotrequest"``, which their decoder needs.
    """
    memo = vars(request)
    wire = memo.get(_MEMO_2022)
    if wire is None:
        value = {"type": "snapshotrequest", **unstructure(request)}
        wire = memo[_MEMO_2022] = json.dumps(value).encode("utf-8")
    return wire


def unstructure(message: Message) -> dict:
    """The JSON value of ``message``, as its generation of Threat Bus encodes it."""
    if isinstance(message, stix.StixObject):
        return stix.unstructure(message)
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
        value = {
            "snapshot_type": message.snapshot_type.value,
            "snapshot_id": message.snapshot_id,
            "body": unstructure(message.body),
        }
        if isinstance(message.body, stix.StixObject):
            return {"type": "snapshotenvelope", **value}
        return value
    raise TypeError(f"not a message: {message!r}")


def decode(topic: str, data: bytes) -> Message:
    """
    The message of bus ``topic`` (e.g. ``threatbus/intel``) encoded in
    ``data``; raises ``DecodeError`` if it is not one.
    """
    cls = BY_TOPIC.get(topic)
    if cls is None:
        raise DecodeError(f"unknown topic {topic!r}")
    return decode_message(cls, data)


def decode_message(cls: type, data: bytes) -> Message:
    """
    The message of class ``cls`` encoded in ``data``; raises
    ``DecodeError`` if it is not one.

    Where ``data`` already is the message's encoding (as JSON values go),
    it is kept as that: forwarding it as it came saves encoding it again.
    """
    # the plain shape straight from its bytes, the rest the general way
    plain = _PLAIN.get(cls)
    if plain is not None and type(data) is bytes and b"\\" not in data:
        message = plain(data)
        if message is not None:
            return message
    value = loads(data)
    message = structure(cls, value)
    if type(message) is not cls:
        raise DecodeError(f"a {message.kind} on topic {cls.topic}")
    if is_encoding(message, value):
        vars(message)[_MEMO] = bytes(data)
    return message


def decode_stix(data: bytes):
    """
    The STIX Indicator or Sighting encoded in ``data``, by its ``type`` (as
    Threat Bus 2022 reads what apps publish on any ``stix2/`` topic); raises
    ``DecodeError`` if it is not one.
    """
    if type(data) is bytes and b"\\" not in data:
        message = _plain_stix(data)
        if message is not None:
            return message
    message = structure_stix(loads(data))
    vars(message)[_MEMO] = bytes(data)
    return message


def structure_stix(value: object):
    """The STIX object that the JSON ``value`` is, or a ``DecodeError``."""
    try:
        return stix.structure(value)
    except stix.StixError as e:
        raise _refused(e) from None


def _refused(e: stix.StixError) -> DecodeError:
    """The ``DecodeError`` of a STIX object refused by ``e``."""
    return DecodeError(str(e), reason="stix_" + e.reason)


def is_encoding(message: Message, value: dict) -> bool:
    """
    Whether the JSON ``value`` that ``message`` was structured from is an
    encoding of it, found cheaply: ``structure`` carries every value over
    unchanged except the 2020 timestamp (parsed), a missing or null
    ``context`` (made ``{}``) and keys of 2020 messages it does not know
    (left out); a STIX object keeps all it came with.
    """
    if isinstance(message, stix.StixObject):
        return True
    if isinstance(message, Intel):
        return value.keys() == _INTEL_KEYS and is_ts_encoding(value["ts"], message.ts)
    if isinstance(message, Sighting):
        return (
            value.keys() == _SIGHTING_KEYS
            and value["context"] is not None
            and is_ts_encoding(value["ts"], message.ts)
        )
    return unstructure(message) == value


_INTEL_KEYS = frozenset(("ts", "id", "data", "operation"))
_SIGHTING_KEYS = frozenset(("ts", "intel", "context", "ioc"))

# What str() makes of a naive datetime: the fraction only when it is not 0.
_NAIVE_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.(?!0{6})[0-9]{6})?")


def is_ts_encoding(raw: str, ts: datetime) -> bool:
    """
    Whether ``raw``, the text that ``ts`` was parsed from, equals ``str(ts)``
    (the encoding): for a naive ``ts`` by its shape alone, which costs a
    fifth of formatting ``ts``.
    """
    if ts.tzinfo is None:
        return _NAIVE_TS.fullmatch(raw) is not None
    return raw == str(ts)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# The deepest nesting of arrays and objects that decodes: far beyond any
# message, and shallow enough that nothing recurses too deeply on it later
# (json.dumps, ==, repr).
MAX_DEPTH = 64


def _object(pairs: list) -> dict:
    """
    A JSON object from its key/value pairs, refusing a key given twice:
    parsers differ in which of the two they keep, and the bus forwards the
    bytes it validated.
    """
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DecodeError(f"invalid JSON: duplicate key {key!r}", reason="duplicate_key")
    return obj


# NaN and Infinity are not JSON: we could not encode them back as JSON.
_scan = json.JSONDecoder(
    parse_float=_finite, parse_constant=_no_constant, object_pairs_hook=_object
).scan_once
_JSON_WHITESPACE = " \t\n\r"

# Each opening bracket as the signed byte 1, each closing one as -1.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[{]}")))
_TOO_DEEP_RUN = b"\x01" * (MAX_DEPTH + 1)


def is_too_deep(text: str) -> bool:
    """
    Whether the JSON ``text`` nests arrays and objects deeper than
    ``MAX_DEPTH``, brackets in strings not counting, in time linear in its
    length, all of it in C loops (a hostile message costs about what parsing
    it does).

    Out of strings, a backslash is no JSON: the parser stops there, so
    dropping every escaped backslash, then every escaped quote, everywhere,
    leaves just the quotes that start or end strings, up to where the parser
    reads. Split at them, every second piece is in a string (one left open
    runs to the end). A deep run of opening brackets is found at once;
    otherwise the depth is the largest running sum of the steps.
    """
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    outside = "".join(unescaped.split('"')[::2])
    # Out of strings, all but brackets can go (non-ASCII is no JSON there).
    steps = outside.encode("ascii", "ignore").translate(_STEPS, _NOT_BRACKETS)
    if _TOO_DEEP_RUN in steps:
        return True
    return max(accumulate(memoryview(steps).cast("b")), default=0) > MAX_DEPTH


def loads(data: bytes) -> object:
    """
    Parse one JSON value from bytes; any failure is a ``DecodeError``, and so
    are duplicate keys and nesting deeper than ``MAX_DEPTH``: the value has
    one meaning and encodes back.
    """
    if not isinstance(data, str):
        # json.loads would also take UTF-16 and UTF-32: the wire is UTF-8.
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("not UTF-8") from None
    text = data.strip(_JSON_WHITESPACE)
    # At most MAX_DEPTH brackets cannot nest deeper than that: the exact look
    # only for the rare message with more.
    if text.count("[") + text.count("{") > MAX_DEPTH and is_too_deep(text):
        raise DecodeError(f"JSON nested too deeply: more than {MAX_DEPTH} levels", reason="too_deep")
    try:
        # json.loads without its wrappers: the scanner reads one value
        value, end = _scan(text, 0)
    except StopIteration as e:
        raise DecodeError(f"invalid JSON: expecting a value at character {e.value}") from None
    except RecursionError:
        raise DecodeError("JSON nested too deeply", reason="too_deep") from None
    except DecodeError:
        raise
    except ValueError as e:
        raise DecodeError(f"invalid JSON: {e}") from None
    if end != len(text):
        raise DecodeError(f"invalid JSON: extra data at character {end}")
    return value


# --- the wire shapes, compiled from the model's field rules

_UNSET = msgspec.UNSET


class _IntelDataWire(msgspec.Struct):
    indicator: Indicators
    intel_type: IntelType


class _IntelWire(msgspec.Struct):
    ts: Text
    id: Text
    data: _IntelDataWire
    operation: Operation


class _SightingWire(msgspec.Struct):
    ts: Text
    intel: Text
    # UNSET: the key is missing (null is None)
    context: Union[Optional[JsonObject], msgspec.UnsetType] = _UNSET
    ioc: Union[Optional[Strings], msgspec.UnsetType] = _UNSET


class _RequestWire(msgspec.Struct):
    snapshot_type: MessageType
    snapshot_id: Text
    snapshot: WireSeconds


class _EnvelopeWire(msgspec.Struct):
    snapshot_type: MessageType
    snapshot_id: Text
    body: Any
    #: A 2022 envelope says what it is; 2020 ones have no type.
    type: Optional[Literal["snapshotenvelope"]] = None


def structure(cls: type, value: object) -> Message:
    """
    The message of class ``cls`` that the JSON ``value`` describes, checked
    against its wire shape (the model's field rules), or a ``DecodeError``.
    """
    if cls in stix.StixObject:
        return structure_stix(value)
    if type(value) is not dict:
        raise DecodeError(f"{cls.__name__} must be a JSON object, not {type(value).__name__}")
    wire_cls, build = _WIRES[cls]
    try:
        wire = msgspec.convert(value, wire_cls)
    except msgspec.ValidationError as e:
        raise DecodeError(f"{cls.__name__}: {e}") from None
    return build(wire, value)


def _timestamp(what: str, raw: str) -> datetime:
    try:
        return datetime.fromisoformat(raw[:-1] + "+00:00" if raw[-1:] == "Z" else raw)
    except ValueError:
        raise DecodeError(f"{what}.ts is not a timestamp: {raw!r}") from None


_RESERVED = ("indicator", "intel_type")


def _intel(wire: _IntelWire, value: dict) -> Intel:
    """The Intel of ``wire``, from the JSON ``value``."""
    extra = {k: v for k, v in value["data"].items() if k not in _RESERVED}
    return _intel_of(wire, _timestamp("Intel", wire.ts), extra)


def _intel_of(wire: _IntelWire, ts: datetime, extra: dict, encoding: Optional[bytes] = None) -> Intel:
    wired = wire.data
    data = trusted(IntelData, {"indicator": wired.indicator, "intel_type": wired.intel_type, "extra": extra})
    fields = {"ts": ts, "id": wire.id, "data": data, "operation": wire.operation}
    if encoding is not None:
        fields[_MEMO] = encoding
    return trusted(Intel, fields)


def _sighting(wire: _SightingWire, value=None) -> Sighting:
    context, ioc = wire.context, wire.ioc
    return trusted(
        Sighting,
        {
            "ts": _timestamp("Sighting", wire.ts),
            "intel": wire.intel,
            "context": {} if context is None or context is _UNSET else context,
            "ioc": None if ioc is _UNSET else ioc,
        },
    )


def _snapshot_request(wire: _RequestWire, value=None) -> SnapshotRequest:
    return trusted(
        SnapshotRequest,
        {
            "snapshot_type": wire.snapshot_type,
            "snapshot_id": wire.snapshot_id,
            "snapshot": timedelta(seconds=wire.snapshot),
        },
    )


def _snapshot_envelope(wire: _EnvelopeWire, value=None) -> SnapshotEnvelope:
    snapshot_type = wire.snapshot_type
    # A 2022 envelope carries a STIX object, a 2020 one a 2020 message; the
    # envelope's constructor checks it is of snapshot_type.
    try:
        if wire.type is None:
            body = structure(Intel if snapshot_type is MessageType.INTEL else Sighting, wire.body)
        else:
            body = structure_stix(wire.body)
    except DecodeError as e:
        raise DecodeError(
            f"SnapshotEnvelope.body (snapshot_type {snapshot_type.name}): {e}", reason=e.reason
        ) from None
    try:
        return SnapshotEnvelope(snapshot_type=snapshot_type, snapshot_id=wire.snapshot_id, body=body)
    except ValueError as e:
        raise DecodeError(f"SnapshotEnvelope: {e}") from None


_WIRES = {
    Intel: (_IntelWire, _intel),
    Sighting: (_SightingWire, _sighting),
    SnapshotRequest: (_RequestWire, _snapshot_request),
    SnapshotEnvelope: (_EnvelopeWire, _snapshot_envelope),
}


# --- the plain shape, decoded straight from bytes


def _strings(value) -> int:
    """How many strings (keys included) the JSON ``value`` holds."""
    kind = type(value)
    if kind is str:
        return 1
    if kind is dict:
        return len(value) + sum(map(_strings, value.values()))
    if kind is list:
        return sum(map(_strings, value))
    return 0


# Each returns the message in ``data``, which keeps ``data`` as its encoding
# if it is that (see is_encoding: all but the timestamp carries over as it
# came), or None if ``data`` is not in the plain shape. msgspec checks the
# fields, and the count of quotes shows that the text holds nothing the wire
# shape did not read (no key twice, none unknown, no extra data), since each
# key and string has two: ``data`` holds no escapes, so every quote is one
# of them.

_intel_decoder = msgspec.json.Decoder(_IntelWire)
_sighting_decoder = msgspec.json.Decoder(_SightingWire)
_request_decoder = msgspec.json.Decoder(_RequestWire)
_DECODE_FAILED = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def _plain_intel(data: bytes):
    try:
        wire = _intel_decoder.decode(data)
    except _DECODE_FAILED:
        return None
    # ts, id, data, operation, indicator, intel_type; the values of ts, id,
    # operation and the indicator's
    if data.count(b'"') != 2 * (9 + len(wire.data.indicator)):
        return None
    ts = _timestamp("Intel", wire.ts)
    if is_ts_encoding(wire.ts, ts):
        return _intel_of(wire, ts, {}, data)
    return _intel_of(wire, ts, {})


def _plain_sighting(data: bytes):
    # only a Sighting's context nests freely: its depth is checked as the
    # general path does
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH:
        return None
    try:
        wire = _sighting_decoder.decode(data)
    except _DECODE_FAILED:
        return None
    strings = 4  # ts, intel and their values
    context, ioc = wire.context, wire.ioc
    if context is not _UNSET:
        strings += 1 + (_strings(context) if context else 0)
    if ioc is not _UNSET:
        strings += 1 + (len(ioc) if ioc else 0)
    if data.count(b'"') != 2 * strings:
        return None
    message = _sighting(wire)
    if (
        context is not _UNSET and context is not None and ioc is not _UNSET
        and is_ts_encoding(wire.ts, message.ts)
    ):
        vars(message)[_MEMO] = data
    return message


def _plain_request(data: bytes):
    try:
        wire = _request_decoder.decode(data)
    except _DECODE_FAILED:
        return None
    if data.count(b'"') != 2 * 4:  # three keys and the snapshot_id
        return None
    message = _snapshot_request(wire)
    vars(message)[_MEMO] = data
    return message


_PLAIN = {Intel: _plain_intel, Sighting: _plain_sighting, SnapshotRequest: _plain_request}


# STIX objects: the types of a class's fields (as it declares them), tagged
# by the object's type; the rules of their values are the class's ``check``.


def _stix_wire(cls: type) -> type:
    """The wire shape of the STIX class ``cls``: its fields but ``properties``."""
    hints = typing.get_type_hints(cls)
    fields = [("spec_version", Literal["2.1"])]
    for field in attrs.fields(cls):
        if field.name != "properties":
            default = () if field.default is attrs.NOTHING else (field.default,)
            fields.append((field.name, hints[field.name], *default))
    return msgspec.defstruct(f"{cls.__name__}Wire", fields, tag_field="type", tag=cls.stix_type)


_IndicatorWire, _StixSightingWire = _stix_wire(stix.Indicator), _stix_wire(stix.Sighting)
_stix_decoder = msgspec.json.Decoder(Union[_IndicatorWire, _StixSightingWire])
_json_decode = msgspec.json.Decoder().decode
#: Each wire shape's class, and the fields it has (not spec_version).
_STIX = {
    wire: (cls, wire.__struct_fields__[1:])
    for wire, cls in ((_IndicatorWire, stix.Indicator), (_StixSightingWire, stix.Sighting))
}


def _plain_stix(data: bytes):
    """
    The STIX object in ``data`` if ``data`` is in its plain shape (no
    escapes, no key twice, fields of the right types), else None; raises
    ``DecodeError`` if it is of that shape but breaks a rule.
    """
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH:
        return None
    try:
        wire = _stix_decoder.decode(data)
        value = _json_decode(data)  # all it holds, properties too
    except _DECODE_FAILED:
        return None
    if data.count(b'"') != 2 * _strings(value):
        return None
    cls, names = _STIX[type(wire)]
    fields = {name: getattr(wire, name) for name in names}
    skip = stix.FIELDS[cls.stix_type]
    fields["properties"] = {k: v for k, v in value.items() if k not in skip}
    fields[_MEMO] = data
    message = trusted(cls, fields)
    try:
        message.check()
    except stix.StixError as e:
        raise _refused(e) from None
    return message


