"""
The field rules are written once (``txthreatbus.model``): the model's
constructors, the codec's two decoding paths (the plain shape straight from
bytes, and the general path) and the golden vectors agree on what is a
message and which one.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import attrs

import msgspec
import msgspec.inspect
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.test_codec import INTEL, REQUEST, SIGHTING, _slots, json_values, messages
from tests.vectors import STIX_VECTORS, VECTORS
from txthreatbus import codec, model, stix
from txthreatbus.model import (
    BY_TOPIC,
    Intel,
    IntelData,
    IntelType,
    MessageType,
    Operation,
    Sighting,
    SnapshotRequest,
)

def is_object(text: str) -> bool:
    try:
        return type(json.loads(text)) is dict
    except ValueError:
        return False


#: The classes with a plain shape, and their topics.
PLAIN = {cls.topic: cls for cls in codec._PLAIN}


def member(enum_cls, raw):
    """The member of ``enum_cls`` that the wire value ``raw`` names, else ``raw`` itself."""
    values = {m.value: m for m in enum_cls}
    if type(raw) is type(next(iter(enum_cls)).value) and raw in values:
        return values[raw]
    return raw


def timestamp(raw):
    """The datetime the wire's ``ts`` names (``Z`` is UTC), else ``raw`` itself."""
    if type(raw) is not str:
        return raw
    try:
        return datetime.fromisoformat(raw[:-1] + "+00:00" if raw[-1:] == "Z" else raw)
    except ValueError:
        return None


def by_the_model(cls, value):
    """
    The message that the model's constructors make of the JSON ``value``,
    each wire field mapped to its model type (and left as it is where it
    maps to none, for the constructor to refuse); None if they refuse it.
    """
    if type(value) is not dict:
        return None
    try:
        if cls is Intel:
            data = value["data"]
            if type(data) is not dict:
                return None
            extra = {k: v for k, v in data.items() if k not in ("indicator", "intel_type")}
            return Intel(
                ts=timestamp(value["ts"]),
                id=value["id"],
                data=IntelData(data["indicator"], member(IntelType, data["intel_type"]), extra),
                operation=member(Operation, value["operation"]),
            )
        if cls is Sighting:
            context = value.get("context")
            return Sighting(
                ts=timestamp(value["ts"]),
                intel=value["intel"],
                context={} if context is None else context,
                ioc=value.get("ioc"),
            )
        seconds = value["snapshot"]
        return SnapshotRequest(
            snapshot_type=member(MessageType, value["snapshot_type"]),
            snapshot_id=value["snapshot_id"],
            snapshot=timedelta(seconds=seconds) if type(seconds) is int else seconds,
        )
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


def by_the_codec(topic, data):
    try:
        return codec.decode(topic, data)
    except codec.DecodeError:
        return None


def plain_path(cls, data):
    """
    The plain path's message and whether it kept ``data`` as its encoding;
    None if ``data`` is not in the plain shape; False if it refused ``data``.
    """
    if b"\\" in data:
        return None
    try:
        message = codec._PLAIN[cls](data)
    except codec.DecodeError:
        return False
    return None if message is None else (message, codec._MEMO in vars(message))


def general(cls, data):
    """The general path's message and whether ``data`` is its encoding, or None."""
    try:
        value = codec.loads(data)
        message = codec.structure(cls, value)
    except codec.DecodeError:
        return None
    return message, codec.is_encoding(message, value)


# The wire values a field may be given: valid ones of every field, and any
# JSON value.
field_values = st.one_of(
    st.sampled_from(
        [
            "2020-11-26 14:46:52", "2020-11-26T14:46:52Z", "2020-13-01 00:00:00", "ADD", "REMOVE", "add",
            11, 48, 0, True, 1.0, 86400, -1, 10**20, ["a"], [], [1], {}, {"a": 1}, None, "x",
        ]
    ),
    json_values,
)
plain_values = st.sampled_from([INTEL, SIGHTING, REQUEST])


def spoiled(value, data):
    """``value`` with one key set to a drawn field value, or deleted."""
    value = json.loads(json.dumps(value))
    container, key = data.draw(st.sampled_from(list(_slots(value))))
    if data.draw(st.booleans()):
        del container[key]
    else:
        container[key] = data.draw(field_values)
    return value


def topic_of(value) -> str:
    if "intel" in value:
        return Sighting.topic
    if "snapshot_id" in value:
        return SnapshotRequest.topic
    return Intel.topic


class ModelAndCodecTests(SynchronousTestCase):
    """The codec accepts what the model's constructors accept, as the same message."""

    @settings(max_examples=500, deadline=None)
    @given(value=plain_values, data=st.data())
    def test_spoiled_fields(self, value, data):
        """A message with any field changed or missing is decoded iff the model takes it, equal."""
        value = spoiled(value, data)
        topic = topic_of(value)
        self.assertEqual(by_the_codec(topic, json.dumps(value).encode()), by_the_model(BY_TOPIC[topic], value))

    @settings(max_examples=200, deadline=None)
    @given(message=messages)
    def test_messages(self, message):
        """Every message the model makes decodes from its encoding to an equal one."""
        if type(message) in codec._PLAIN:
            value = json.loads(codec.encode(message))
            self.assertEqual(by_the_model(type(message), value), message)
            self.assertEqual(by_the_codec(message.topic, codec.encode(message)), message)

    def test_golden_vectors(self):
        """
        Each golden vector is the same message by the model and the general
        path, and by the plain path where it is in the plain shape.
        """
        plain = 0
        for vector in VECTORS["vectors"]:
            topic = "threatbus/" + vector["kind"]
            data = vector["json"].encode()
            cls = BY_TOPIC[topic]
            if cls in codec._PLAIN:
                message = by_the_model(cls, json.loads(data))
                self.assertIsNotNone(message, vector["description"])
                self.assertEqual(general(cls, data)[0], message, vector["description"])
                decoded = plain_path(cls, data)
                if decoded:
                    plain += 1
                    self.assertEqual(decoded[0], message, vector["description"])
        self.assertGreaterEqual(plain, 5)


def _variants(data: st.DataObject, value: dict) -> bytes:
    """``value`` as JSON, maybe in another spelling: separators, escapes, a key repeated or unknown."""
    text = json.dumps(value, separators=data.draw(st.sampled_from([(", ", ": "), (",", ":"), (" ,", " : ")])))
    change = data.draw(st.sampled_from(["none", "repeat", "unknown", "escape", "space", "trailing"]))
    if change == "repeat":
        key = data.draw(st.sampled_from(sorted(value)))
        text = text[:-1] + f', "{key}": ' + json.dumps(data.draw(field_values)) + "}"
    elif change == "unknown":
        text = text[:-1] + ', "x": ' + json.dumps(data.draw(field_values)) + "}"
    elif change == "escape":
        text = text.replace("e", "\\u0065", 1)
    elif change == "space":
        text = " \n" + text + "\t"
    elif change == "trailing":
        text += data.draw(st.sampled_from([" {}", "x", "]"]))
    return text.encode()


class PlainPathTests(SynchronousTestCase):
    """The plain path takes only what the general path takes, as the same message."""

    @settings(max_examples=500, deadline=None)
    @given(value=plain_values, data=st.data())
    @example(value=INTEL, data=None)
    def test_agrees_with_general(self, value, data):
        """Where the plain path decodes, the general one gives an equal message, encoding alike."""
        if data is None:  # the plain shape itself
            raw, cls = json.dumps(value).encode(), Intel
        else:
            if data.draw(st.booleans()):
                value = spoiled(value, data)
            raw = _variants(data, value)
            cls = BY_TOPIC[topic_of(value)]
        plain = plain_path(cls, raw)
        if plain is False:
            self.assertIsNone(general(cls, raw))
        elif plain is not None:
            self.assertEqual(plain, general(cls, raw))
        elif data is None:
            self.fail("the plain shape did not take the plain path")

    def test_repeated_key(self):
        """A key given twice leaves the plain path, and the general one refuses it."""
        raw = json.dumps(INTEL).encode()[:-1] + b', "id": "other"}'
        self.assertIsNone(plain_path(Intel, raw))
        e = self.assertRaises(codec.DecodeError, codec.decode, Intel.topic, raw)
        self.assertEqual(e.reason, "duplicate_key")

    def test_extra_data(self):
        """Intel with extra data keys leaves the plain path, and keeps them."""
        value = json.loads(json.dumps(INTEL))
        value["data"]["source"] = "MISP"
        raw = json.dumps(value).encode()
        self.assertIsNone(plain_path(Intel, raw))
        self.assertEqual(codec.decode(Intel.topic, raw).data.extra, {"source": "MISP"})

    def test_trusted_values_are_the_constructors(self):
        """What the plain path builds without validators equals what the constructors build."""
        message, encoded = plain_path(Intel, json.dumps(INTEL).encode())
        self.assertTrue(encoded)
        self.assertEqual(message, by_the_model(Intel, INTEL))
        self.assertEqual(vars(message).keys() - {codec._MEMO}, vars(by_the_model(Intel, INTEL)).keys())


def stix_general(data: bytes):
    """The general path's STIX object, or the reason it refuses ``data``."""
    try:
        return codec.structure_stix(codec.loads(data))
    except codec.DecodeError as e:
        return e.reason


def stix_plain(data: bytes):
    """The plain path's STIX object, the reason it refuses ``data``, or None (not the plain shape)."""
    if b"\\" in data:
        return None
    try:
        return codec._plain_stix(data)
    except codec.DecodeError as e:
        return e.reason


_stix_values = st.sampled_from([json.loads(e["json"]) for e in STIX_VECTORS["objects"] if is_object(e["json"])])


class StixPathTests(SynchronousTestCase):
    """The STIX plain path takes what the general path takes, as the same object, and refuses alike."""

    def test_vectors(self):
        """Every recorded object gets the same verdict, and object, from both paths."""
        plain = 0
        for entry in STIX_VECTORS["objects"]:
            data = entry["json"].encode()
            decided = stix_plain(data)
            if decided is not None:
                plain += 1
                self.assertEqual(decided, stix_general(data), entry["description"])
        self.assertGreater(plain, 50)

    @settings(max_examples=300, deadline=None)
    @given(value=_stix_values, data=st.data())
    def test_spoiled(self, value, data):
        """An object with a field changed, deleted or repeated gets the same verdict from both paths."""
        if data.draw(st.booleans()):
            value = spoiled(value, data)
        raw = _variants(data, value) if value else b"{}"
        decided = stix_plain(raw)
        if decided is not None:
            self.assertEqual(decided, stix_general(raw))

    def test_constructor_is_the_check(self):
        """What the plain path builds without the constructor equals what the constructor builds."""
        for entry in STIX_VECTORS["objects"]:
            made = stix_plain(entry["json"].encode())
            if isinstance(made, stix.StixObject):
                cls = type(made)
                self.assertEqual(cls(**{f.name: getattr(made, f.name) for f in attrs.fields(cls)}), made)


def msgspec_takes(value, rule) -> bool:
    try:
        msgspec.convert(value, rule, strict=True)
    except msgspec.ValidationError:
        return False
    return True


class RuleTests(SynchronousTestCase):
    """The constructors' plain tests of a rule say what msgspec says of it."""

    @settings(max_examples=300, deadline=None)
    @given(
        rule=st.sampled_from([model.Indicators, model.Strings, model.JsonObject, model.Text]),
        value=json_values | st.lists(json_values, max_size=3).map(tuple) | st.tuples(st.text(max_size=5)),
    )
    def test_plain_test_is_msgspec(self, rule, value):
        """For any value, a rule's plain test and msgspec's strict conversion agree."""
        self.assertEqual(model._test(msgspec.inspect.type_info(rule))(value), msgspec_takes(value, rule))
