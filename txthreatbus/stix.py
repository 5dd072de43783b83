"""
The messages of Threat Bus's STIX-2 generation (2021 and later): one STIX
2.1 Indicator or Sighting object per message, as frozen attrs values.

An object keeps every property it came with: the ones the bus reads are
fields, checked on construction; the rest (``name``, ``labels``, the
``x_threatbus_*`` properties, any custom ones) stay in ``properties`` as the
JSON values they were, and the ones STIX defines are checked too. What a
2022 Threat Bus accepts (the ``stix2`` library with custom properties
allowed) is accepted here, but an object must have an ``id``, and nothing
is filled in: the bus forwards the bytes an app sent.

Each class's rules are one method, ``check``: the constructor runs it, and
the codec runs it once on an object it built from the plain shape without
the constructor (``model.trusted``). ``structure`` builds an object from a
decoded JSON object and raises ``StixError`` with a ``reason`` to count it
by; ``unstructure`` is its inverse.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import ClassVar, Optional

import attrs

from txthreatbus import patterns

#: The version of STIX the objects are in.
SPEC_VERSION = "2.1"


class StixError(ValueError):
    """
    Not a STIX object the bus carries; ``reason`` says which kind:
    ``spec_version``, ``unknown_type``, ``bundle``, ``invalid_pattern`` or
    ``malformed``.
    """

    def __init__(self, message: str, *, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


# --- property checks

_CANONICAL_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
)
_IDENTIFIER = re.compile(r"([a-z0-9][a-z0-9-]*[a-z0-9])--(.+)")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?[Zz]")


def is_identifier(value, of_type: Optional[str] = None) -> bool:
    """
    Whether ``value`` is a STIX identifier ``<type>--<RFC 4122 UUID>`` (of
    type ``of_type``, if given), as the ``stix2`` library checks it.
    """
    if type(value) is not str:
        return False
    match = _IDENTIFIER.fullmatch(value)
    if match is None or (of_type is not None and match.group(1) != of_type):
        return False
    tail = match.group(2)
    if _CANONICAL_UUID.fullmatch(tail):
        return True
    try:  # the other spellings uuid.UUID takes, as the library does
        return uuid.UUID(tail).variant == uuid.RFC_4122
    except ValueError:
        return False


def parse_timestamp(value: str) -> datetime:
    """The instant of a STIX timestamp (``2022-05-16T10:00:00.123Z``), in UTC."""
    return datetime.fromisoformat(value[:-1]).replace(tzinfo=timezone.utc)


def format_timestamp(ts: datetime) -> str:
    """``ts`` as a STIX timestamp to the millisecond (naive ``ts`` is taken as UTC)."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(timezone.utc)
    # (strftime's %Y does not pad years before 1000)
    return f"{ts.year:04d}-" + ts.strftime("%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _timestamp(name: str, value) -> None:
    if type(value) is not str or _TIMESTAMP.fullmatch(value) is None:
        raise StixError(f"{name} must be a STIX timestamp (YYYY-MM-DDTHH:MM:SS[.s]Z), not {value!r}")
    try:
        datetime.fromisoformat(value[:-1])  # a date and time that exist
    except ValueError:
        raise StixError(f"{name} is not a date and time: {value!r}") from None


def _string(name: str, value) -> None:
    if type(value) is not str:
        raise StixError(f"{name} must be a string, not {type(value).__name__}")


def _count(name: str, value) -> None:
    # the library takes anything int() takes, as it does
    try:
        value = int(value)
    except (TypeError, ValueError, OverflowError):
        value = None
    if value is None or not 0 <= value <= 999_999_999:
        raise StixError(f"{name} must be a whole number from 0 to 999999999")


def _integer(name: str, value) -> None:
    try:
        int(value)
    except (TypeError, ValueError, OverflowError):
        raise StixError(f"{name} must be a whole number, not {value!r}") from None


_BOOLEANS = ("true", "t", "1", "false", "f", "0", True, False, 1, 0)


def _boolean(name: str, value) -> None:
    if (value.lower() if type(value) is str else value) not in _BOOLEANS:
        raise StixError(f"{name} must be true or false, not {value!r}")


def _reference(name: str, value) -> None:
    if not is_identifier(value):
        raise StixError(f"{name} must be a STIX identifier (<type>--<uuid>), not {value!r}")


def _references(name: str, value) -> None:
    if type(value) is not list or not all(is_identifier(v) for v in value):
        raise StixError(f"{name} must be a list of STIX identifiers")


# The properties the library checks strictly (others it coerces, or they are
# custom: both are carried as they came, and read with care by the bridge).
_COMMON = {
    "created_by_ref": _reference,
    "object_marking_refs": _references,
    "confidence": _integer,
    "revoked": _boolean,
}
_INDICATOR_PROPERTIES = {**_COMMON, "valid_until": _timestamp}
_SIGHTING_PROPERTIES = {
    **_COMMON,
    "first_seen": _timestamp,
    "count": _count,
    "observed_data_refs": _references,
    "where_sighted_refs": _references,
}

#: Types that are not STIX Domain Objects, which a Sighting cannot be of:
#: cyber-observables, relationships and meta objects.
NOT_SIGHTABLE = frozenset(
    "artifact autonomous-system directory domain-name email-addr email-message file "
    "ipv4-addr ipv6-addr mac-addr mutex network-traffic process software url user-account "
    "windows-registry-key x509-certificate relationship sighting marking-definition "
    "language-content extension-definition bundle".split()
)


def _in_order(first_name: str, first, then_name: str, then, strictly: bool = False) -> None:
    """Refuse timestamps (both checked already, or None) that are out of order."""
    if first is None or then is None:
        return
    first, then = parse_timestamp(first), parse_timestamp(then)
    if then < first or strictly and then == first:
        later = "later than" if strictly else "the same as or later than"
        raise StixError(f"{then_name} must be {later} {first_name}")


def _check_properties(checks: dict, properties: dict) -> None:
    for name, value in properties.items():
        check = checks.get(name)
        if check is not None:
            check(name, value)


def _timestamps(obj, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            _timestamp(name, value)


def _id(type_name: str, value) -> None:
    if not is_identifier(value, type_name):
        raise StixError(f"id must be {type_name}--<RFC 4122 UUID>, not {value!r}")


def _properties(checks: dict, fields: frozenset, value) -> None:
    if type(value) is not dict:
        raise TypeError(f"properties must be a dict, not {type(value).__name__}")
    if not fields.isdisjoint(value):
        raise ValueError(f"properties must not repeat {sorted(fields & value.keys())}")
    _check_properties(checks, value)


# Like the 2020 messages, not slotted: the codec memoises encodings in them.
_message = attrs.frozen(slots=False)

_INDICATOR_FIELDS = frozenset(
    ("type", "spec_version", "id", "created", "modified", "pattern", "pattern_type", "valid_from")
)
_SIGHTING_FIELDS = frozenset(
    ("type", "spec_version", "id", "created", "modified", "sighting_of_ref", "last_seen")
)
#: The keys of an object of each type that are its fields, not properties.
FIELDS = {"indicator": _INDICATOR_FIELDS, "sighting": _SIGHTING_FIELDS}


@_message
class Indicator:
    """
    A STIX 2.1 Indicator: a ``pattern`` of ``pattern_type`` (``stix``
    patterns are checked as STIX 2.1 has them; Suricata, Snort, YARA or Sigma
    rules are carried as they are).
    """

    topic: ClassVar[str] = "stix2/indicator"
    kind: ClassVar[str] = "indicator"
    stix_type: ClassVar[str] = "indicator"

    id: str
    pattern: str
    pattern_type: str
    created: Optional[str] = None
    modified: Optional[str] = None
    valid_from: Optional[str] = None
    properties: dict = attrs.field(factory=dict)

    def __attrs_post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse, with a ``StixError``, an Indicator that breaks a rule."""
        _id("indicator", self.id)
        if type(self.pattern) is not str:
            raise StixError(
                f"pattern must be a string, not {type(self.pattern).__name__}", reason="invalid_pattern"
            )
        _string("pattern_type", self.pattern_type)
        if self.pattern_type == "stix":
            # as the library does: a pattern_version other than 2.1 is 2.0's grammar
            version = self.properties.get("pattern_version", SPEC_VERSION)
            try:
                patterns.validate(self.pattern, "2.1" if version == SPEC_VERSION else "2.0")
            except patterns.PatternError as e:
                raise StixError(f"invalid STIX pattern: {e}", reason="invalid_pattern") from None
        _timestamps(self, ("created", "modified", "valid_from"))
        _properties(_INDICATOR_PROPERTIES, _INDICATOR_FIELDS, self.properties)
        _in_order("valid_from", self.valid_from, "valid_until", self.properties.get("valid_until"), strictly=True)

    @property
    def removes(self) -> bool:
        """Whether the Indicator withdraws an earlier one (``x_threatbus_update: REMOVE``)."""
        return self.properties.get("x_threatbus_update") == "REMOVE"


@_message
class Sighting:
    """A STIX 2.1 Sighting of the object ``sighting_of_ref`` (usually an Indicator)."""

    topic: ClassVar[str] = "stix2/sighting"
    kind: ClassVar[str] = "stix_sighting"
    stix_type: ClassVar[str] = "sighting"

    id: str
    sighting_of_ref: str
    created: Optional[str] = None
    modified: Optional[str] = None
    last_seen: Optional[str] = None
    properties: dict = attrs.field(factory=dict)

    def __attrs_post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse, with a ``StixError``, a Sighting that breaks a rule."""
        _id("sighting", self.id)
        _reference("sighting_of_ref", self.sighting_of_ref)
        if self.sighting_of_ref.partition("--")[0] in NOT_SIGHTABLE:
            raise StixError(f"sighting_of_ref must name a STIX Domain Object, not {self.sighting_of_ref!r}")
        _timestamps(self, ("created", "modified", "last_seen"))
        _properties(_SIGHTING_PROPERTIES, _SIGHTING_FIELDS, self.properties)
        _in_order("first_seen", self.properties.get("first_seen"), "last_seen", self.last_seen)


StixObject = (Indicator, Sighting)


# --- JSON


def structure(value) -> object:
    """
    The Indicator or Sighting that the decoded JSON ``value`` is; raises
    ``StixError`` for anything else.
    """
    if type(value) is not dict:
        raise StixError(f"a STIX object must be a JSON object, not {type(value).__name__}")
    kind = value.get("type")
    cls = _CLASSES.get(kind)
    if cls is None:
        if kind == "bundle":
            raise StixError("a bundle: publish its objects one by one", reason="bundle")
        raise StixError(f"a STIX object of type {kind!r}: only indicator and sighting travel", reason="unknown_type")
    if value.get("spec_version") != SPEC_VERSION:
        raise StixError(
            f"spec_version must be {SPEC_VERSION!r}, not {value.get('spec_version')!r}",
            reason="spec_version",
        )
    try:
        return _STRUCTURERS[cls](value)
    except StixError:
        raise
    except KeyError as e:
        raise StixError(f"{kind} has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise StixError(f"{kind}: {e}") from None


def _rest(value: dict, fields: frozenset) -> dict:
    return {k: v for k, v in value.items() if k not in fields}


def _indicator(value: dict) -> Indicator:
    return Indicator(
        id=value["id"],
        pattern=value["pattern"],
        pattern_type=value["pattern_type"],
        created=value.get("created"),
        modified=value.get("modified"),
        valid_from=value.get("valid_from"),
        properties=_rest(value, _INDICATOR_FIELDS),
    )


def _sighting(value: dict) -> Sighting:
    return Sighting(
        id=value["id"],
        sighting_of_ref=value["sighting_of_ref"],
        created=value.get("created"),
        modified=value.get("modified"),
        last_seen=value.get("last_seen"),
        properties=_rest(value, _SIGHTING_FIELDS),
    )


_CLASSES = {"indicator": Indicator, "sighting": Sighting}
_STRUCTURERS = {Indicator: _indicator, Sighting: _sighting}


def unstructure(obj) -> dict:
    """The JSON value of the STIX object ``obj``, properties in STIX's order."""
    value = {"type": obj.stix_type, "spec_version": SPEC_VERSION, "id": obj.id}
    for name in ("created", "modified"):
        if getattr(obj, name) is not None:
            value[name] = getattr(obj, name)
    if isinstance(obj, Indicator):
        value["pattern"] = obj.pattern
        value["pattern_type"] = obj.pattern_type
        if obj.valid_from is not None:
            value["valid_from"] = obj.valid_from
    else:
        value["sighting_of_ref"] = obj.sighting_of_ref
        if obj.last_seen is not None:
            value["last_seen"] = obj.last_seen
    value.update(obj.properties)
    return value
