"""
The messages that travel on the bus, as frozen attrs values.

They mirror Threat Bus 2020.11.26's ``threatbus.data`` so that its apps and
ours agree on every field; ``txthreatbus.codec`` turns them into the wire
JSON and back. Every constructor validates its fields: a message that exists
is well formed. The codec relies on that instead of checking fields again.
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta
from typing import Annotated, Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import attrs
import msgspec
from msgspec import Meta, inspect

from txthreatbus import stix


class Operation(enum.Enum):
    """What an Intel item asks of its receivers."""

    ADD = "ADD"
    REMOVE = "REMOVE"


class IntelType(enum.IntEnum):
    """The kind of indicator, numbered as Threat Bus 2020.11.26 numbers it."""

    IPSRC = 1
    IPDST = 2
    IPSRC_PORT = 3
    IPDST_PORT = 4
    EMAILSRC = 5
    EMAILDST = 6
    TARGETEMAIL = 7
    EMAILATTACHMENT = 8
    FILENAME = 9
    HOSTNAME = 10
    DOMAIN = 11
    DOMAIN_IP = 12
    URL = 13
    URI = 14
    USERAGENT = 15
    MD5 = 16
    MALWARESAMPLE = 17
    FILENAME_MD5 = 18
    SHA1 = 19
    FILENAME_SHA1 = 20
    SHA256 = 21
    FILENAME_SHA256 = 22
    X509FINGERPRINTSHA1 = 23
    PDB = 24
    AUTHENTIHASH = 25
    SSDEEP = 26
    IMPHASH = 27
    PEHASH = 28
    IMPFUZZY = 29
    SHA224 = 30
    SHA384 = 31
    SHA512 = 32
    SHA512_224 = 33
    SHA512_256 = 34
    TLSH = 35
    CDHASH = 36
    FILENAME_AUTHENTIHASH = 37
    FILENAME_SSDEEP = 38
    FILENAME_IMPHASH = 39
    FILENAME_PEHASH = 40
    FILENAME_IMPFUZZY = 41
    FILENAME_SHA224 = 42
    FILENAME_SHA384 = 43
    FILENAME_SHA512 = 44
    FILENAME_SHA512_224 = 45
    FILENAME_SHA512_256 = 46
    FILENAME_TLSH = 47


class MessageType(enum.IntEnum):
    """The kinds of message a snapshot can carry."""

    INTEL = 1
    SIGHTING = 2


# --- the field rules
#
# Each field's rule is written once, as a type that msgspec reads: the
# constructors below check their arguments against it (``_follows``), and
# the codec compiles its wire decoders from the same types
# (``txthreatbus.codec``), so that what the model accepts and what the wire
# accepts cannot drift apart. ``trusted`` builds a message from values the
# codec has already checked, without checking them a second time.

#: An indicator: its values, at least one.
Indicators = Annotated[Tuple[str, ...], Meta(min_length=1, description="a non-empty list of strings")]
#: A list of strings.
Strings = Annotated[Tuple[str, ...], Meta(description="a list of strings")]
#: A JSON object.
JsonObject = Annotated[Dict[str, Any], Meta(description="a JSON object (a dict)")]
#: Text.
Text = Annotated[str, Meta(description="str")]
#: A snapshot's span on the wire: whole seconds, more than none, that fit a timedelta.
WireSeconds = Annotated[
    int,
    Meta(gt=0, le=timedelta.max // timedelta(seconds=1), description="a number of seconds > 0"),
]


def _description(rule) -> str:
    """What ``rule`` asks for, in words."""
    for meta in getattr(rule, "__metadata__", ()):
        if isinstance(meta, Meta) and meta.description:
            return meta.description
    name = getattr(rule, "__name__", str(rule))
    return f"an {name}" if name[0] in "AEIOU" else f"a {name}"


_ARRAYS = (tuple, list)


def _test(info) -> Callable[[object], bool]:
    """
    Whether a value follows the msgspec type ``info`` (``msgspec.inspect``),
    as a plain function: asking msgspec costs more than the check itself.
    Only the kinds of type the rules use are known.
    """
    if isinstance(info, inspect.Metadata):
        return _test(info.type)
    if isinstance(info, inspect.AnyType):
        return lambda value: True
    if isinstance(info, inspect.StrType) and info == inspect.StrType():
        return lambda value: isinstance(value, str)
    if isinstance(info, inspect.VarTupleType) and not info.max_length:
        item, least = _test(info.item_type), info.min_length or 0
        # (a list too, as msgspec takes it: the fields' converter makes it a tuple)
        return lambda value: type(value) in _ARRAYS and len(value) >= least and all(map(item, value))
    if isinstance(info, inspect.DictType) and not (info.min_length or info.max_length):
        key, item = _test(info.key_type), _test(info.value_type)
        return lambda value: type(value) is dict and all(map(key, value)) and all(map(item, value.values()))
    raise TypeError(f"no plain test for {info}")


def _follows(rule):
    """
    A validator: the value follows ``rule``. A class (an enumeration, a
    datetime, a message) is followed by its instances; any other rule is
    followed as msgspec would strictly take it (no coercion: ``"1"`` is no
    int), which says why not.
    """
    what = _description(rule)
    if isinstance(rule, type):

        def validate(instance, attribute, value):
            if not isinstance(value, rule):
                raise TypeError(f"{attribute.name} must be {what}, not {type(value).__name__}")

        return validate

    test = _test(inspect.type_info(rule))

    def validate(instance, attribute, value):
        if test(value):
            return
        try:
            msgspec.convert(value, rule, strict=True)
        except msgspec.ValidationError as e:
            # "Expected `str`, got `int`" is the wrong type; the rest break a constraint
            error = TypeError if ", got `" in str(e) else ValueError
            raise error(f"{attribute.name} must be {what}, not {value!r:.200} ({e})") from None
        raise TypeError(f"{attribute.name} must be {what}, not {value!r:.200}")

    return validate


def _optional(validate):
    def optional(instance, attribute, value):
        if value is not None:
            validate(instance, attribute, value)

    return optional


def _tuple(value):
    return tuple(value) if type(value) is list else value


def trusted(cls, fields: dict):
    """
    A ``cls`` message of ``fields`` that follow its rules already (the codec
    checked them when it decoded them): its validators do not run again.
    """
    message = _new(cls)
    _setattr(message, "__dict__", fields)
    return message


_new = object.__new__
_setattr = object.__setattr__


# Messages are not slotted: the codec memoises each message's encoding in the
# instance dictionary, so that one message sent to many apps is encoded once.
_message = attrs.frozen(slots=False)


@_message
class IntelData:
    """The indicator of an Intel item, its type, and any extra keys."""

    indicator: Indicators = attrs.field(converter=_tuple, validator=_follows(Indicators))
    intel_type: IntelType = attrs.field(validator=_follows(IntelType))
    #: The other keys of the wire's ``data``, as JSON values.
    extra: JsonObject = attrs.field(factory=dict, validator=_follows(JsonObject))

    @extra.validator
    def _extra(self, attribute, value):
        if "indicator" in value or "intel_type" in value:
            reserved = sorted({"indicator", "intel_type"} & value.keys())
            raise ValueError(f"extra data must not repeat {reserved}")


@_message
class Intel:
    """An indicator of compromise, added or removed."""

    topic: ClassVar[str] = "threatbus/intel"
    kind: ClassVar[str] = "intel"

    ts: datetime = attrs.field(validator=_follows(datetime))
    id: Text = attrs.field(validator=_follows(Text))
    data: IntelData = attrs.field(validator=_follows(IntelData))
    operation: Operation = attrs.field(validator=_follows(Operation))


@_message
class Sighting:
    """An indicator seen in the wild: which Intel item, where, and what."""

    topic: ClassVar[str] = "threatbus/sighting"
    kind: ClassVar[str] = "sighting"

    ts: datetime = attrs.field(validator=_follows(datetime))
    intel: Text = attrs.field(validator=_follows(Text))
    context: JsonObject = attrs.field(factory=dict, validator=_follows(JsonObject))
    ioc: Optional[Strings] = attrs.field(
        default=None, converter=_tuple, validator=_optional(_follows(Strings))
    )


def _positive_seconds(instance, attribute, value):
    # The wire carries whole seconds (WireSeconds): anything else would not
    # survive encoding.
    if not isinstance(value, timedelta) or value % timedelta(seconds=1):
        raise ValueError(f"{attribute.name} must be a whole number of seconds, not {value!r}")
    try:
        msgspec.convert(value // timedelta(seconds=1), WireSeconds)
    except msgspec.ValidationError:
        raise ValueError(
            f"{attribute.name} must be a positive whole number of seconds, not {value!r}"
        )


@_message
class SnapshotRequest:
    """A request to every app for its items of the last ``snapshot``."""

    topic: ClassVar[str] = "threatbus/snapshotrequest"
    kind: ClassVar[str] = "snapshotrequest"

    snapshot_type: MessageType = attrs.field(validator=_follows(MessageType))
    snapshot_id: Text = attrs.field(validator=_follows(Text))
    snapshot: timedelta = attrs.field(validator=_positive_seconds)


#: What a snapshot of each type carries, in either generation.
_BODY_TYPES = {
    MessageType.INTEL: (Intel, stix.Indicator),
    MessageType.SIGHTING: (Sighting, stix.Sighting),
}


@_message
class SnapshotEnvelope:
    """
    One item of a snapshot, on its way back to the app that asked: a 2020
    Intel or Sighting, or a STIX Indicator or Sighting.
    """

    topic: ClassVar[str] = "threatbus/snapshotenvelope"
    kind: ClassVar[str] = "snapshotenvelope"

    snapshot_type: MessageType = attrs.field(validator=_follows(MessageType))
    snapshot_id: Text = attrs.field(validator=_follows(Text))
    body: Union[Intel, Sighting, stix.Indicator, stix.Sighting] = attrs.field()

    @body.validator
    def _body_matches_type(self, attribute, value):
        expected = _BODY_TYPES[self.snapshot_type]
        if not isinstance(value, expected):
            raise ValueError(
                f"a {self.snapshot_type.name} snapshot envelope must carry "
                f"{' or '.join(c.__name__ for c in expected)}, not {type(value).__name__}"
            )


def _non_negative_timedelta(instance, attribute, value):
    if not isinstance(value, timedelta) or value < timedelta(0):
        raise ValueError(f"{attribute.name} must be a duration >= 0, not {value!r}")


@attrs.frozen
class Subscription:
    """An app's wish to receive ``topic``, with a snapshot of the last ``snapshot``."""

    topic: Text = attrs.field(validator=_follows(Text))
    snapshot: timedelta = attrs.field(default=timedelta(0), validator=_non_negative_timedelta)


@attrs.frozen
class Unsubscription:
    """An app's wish to stop receiving on its point-to-point topic."""

    topic: Text = attrs.field(validator=_follows(Text))


Message = Union[Intel, Sighting, stix.Indicator, stix.Sighting, SnapshotRequest, SnapshotEnvelope]

#: Every message class, each with its own bus topic and ``kind``.
CLASSES = (Intel, Sighting, stix.Indicator, stix.Sighting, SnapshotRequest, SnapshotEnvelope)
#: Message classes by their bus topic.
BY_TOPIC = {cls.topic: cls for cls in CLASSES}

#: The message type a topic carries items of, for snapshots.
MESSAGE_TYPES = {
    Intel.topic: MessageType.INTEL,
    Sighting.topic: MessageType.SIGHTING,
    stix.Indicator.topic: MessageType.INTEL,
    stix.Sighting.topic: MessageType.SIGHTING,
}

#: The root topic of the STIX-2 generation: a topic under it is a 2022 one.
STIX_ROOT = "stix2"


def is_stix_topic(topic: str) -> bool:
    """Whether ``topic`` is of the STIX-2 generation (``stix2`` or under it)."""
    return topic == STIX_ROOT or topic.startswith(STIX_ROOT + "/")
