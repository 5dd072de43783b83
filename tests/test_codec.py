"""
The wire codec: the golden vectors of Threat Bus 2020.11.26 decode and
encode back to the same JSON; malformed input only ever raises DecodeError.
"""

from __future__ import annotations

import json
import pickle
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.vectors import VECTORS
from txthreatbus import codec, model
from txthreatbus.model import (
    Intel,
    IntelData,
    IntelType,
    MessageType,
    Operation,
    Sighting,
    SnapshotEnvelope,
    SnapshotRequest,
)


TOPICS = sorted(model.BY_TOPIC)

INTEL = {
    "ts": "2020-11-26 14:46:52.123456",
    "id": "intel-1",
    "data": {"indicator": ["evil.example.com"], "intel_type": 11},
    "operation": "ADD",
}
SIGHTING = {
    "ts": "2020-11-26 14:46:53",
    "intel": "intel-1",
    "context": {"source": "VAST"},
    "ioc": ["evil.example.com"],
}
REQUEST = {"snapshot_type": 1, "snapshot_id": "8f3a2c1e", "snapshot": 86400}
ENVELOPE = {"snapshot_type": 1, "snapshot_id": "8f3a2c1e", "body": INTEL}


def changed(value: dict, path: str, new=None, delete: bool = False) -> dict:
    """A deep copy of ``value`` with the key at dotted ``path`` set to ``new`` (or deleted)."""
    copy = json.loads(json.dumps(value))
    *parents, last = path.split(".")
    inner = copy
    for key in parents:
        inner = inner[key]
    if delete:
        del inner[last]
    else:
        inner[last] = new
    return copy


def dumps(value) -> bytes:
    return json.dumps(value).encode("utf-8")


class GoldenVectorTests(SynchronousTestCase):
    """Every golden vector decodes and encodes back to an equal JSON value."""

    def test_there_are_vectors(self):
        """The vectors cover every message class."""
        self.assertEqual(
            {v["decodes_to_type"] for v in VECTORS["vectors"]},
            {"Intel", "Sighting", "SnapshotRequest", "SnapshotEnvelope"},
        )

    def test_decode_type(self):
        """Each vector decodes to its decodes_to_type class."""
        for vector in VECTORS["vectors"]:
            message = codec.decode("threatbus/" + vector["kind"], vector["json"].encode())
            self.assertEqual(type(message).__name__, vector["decodes_to_type"], vector["description"])

    def test_round_trip(self):
        """Each vector re-encodes to a JSON value equal to the original."""
        for vector in VECTORS["vectors"]:
            message = codec.decode("threatbus/" + vector["kind"], vector["json"].encode())
            self.assertEqual(
                json.loads(codec.encode(message)), json.loads(vector["json"]), vector["description"]
            )

    def test_fields(self):
        """The first Intel vector's fields decode to the model's types."""
        message = codec.decode("threatbus/intel", VECTORS["vectors"][0]["json"].encode())
        self.assertEqual(message.ts, datetime(2020, 11, 26, 14, 46, 52, 123456))
        self.assertEqual(message.data.indicator, ("evil.example.com",))
        self.assertIs(message.data.intel_type, IntelType.DOMAIN)
        self.assertIs(message.operation, Operation.ADD)

    def test_aware_ts(self):
        """A ts with a UTC offset keeps its offset."""
        vector = next(v for v in VECTORS["vectors"] if "+02:00" in v["json"])
        message = codec.decode("threatbus/intel", vector["json"].encode())
        self.assertEqual(message.ts.utcoffset(), timedelta(hours=2))

    def test_extra_data_kept(self):
        """Extra keys of Intel data survive decoding."""
        vector = next(v for v in VECTORS["vectors"] if "extra data keys" in v["description"])
        message = codec.decode("threatbus/intel", vector["json"].encode())
        self.assertEqual(message.data.extra, {"source": "MISP", "confidence": 0.8})

    def test_snapshot_seconds(self):
        """A SnapshotRequest's snapshot is seconds on the wire."""
        message = codec.decode("threatbus/snapshotrequest", dumps(REQUEST))
        self.assertEqual(message.snapshot, timedelta(days=1))
        self.assertEqual(json.loads(codec.encode(message))["snapshot"], 86400)


class EncodeTests(SynchronousTestCase):
    """Encoding happens once per message."""

    def test_encoded_once(self):
        """A second encode of one message returns the identical bytes object."""
        message = codec.decode("threatbus/intel", dumps(INTEL))
        first = codec.encode(message)
        self.assertIsInstance(first, bytes)
        self.assertIs(codec.encode(message), first)

    def test_memo_not_shared(self):
        """Equal messages made apart encode to equal bytes; different ones do not share."""
        a = codec.decode("threatbus/intel", dumps(INTEL))
        b = codec.decode("threatbus/intel", dumps(changed(INTEL, "id", "intel-2")))
        self.assertNotEqual(codec.encode(a), codec.encode(b))
        self.assertEqual(a, codec.decode("threatbus/intel", dumps(INTEL)))

    def test_memo_ignored_by_equality(self):
        """An encoded message still equals the same message not yet encoded."""
        a = codec.decode("threatbus/sighting", dumps(SIGHTING))
        codec.encode(a)
        self.assertEqual(a, codec.decode("threatbus/sighting", dumps(SIGHTING)))

    def test_canonical_input_forwarded(self):
        """Input that already is the message's encoding is reused as it came."""
        data = dumps(INTEL)
        self.assertIs(codec.encode(codec.decode("threatbus/intel", data)), data)

    def test_other_input_encoded(self):
        """Input that decodes to a message but differs from its encoding is encoded anew."""
        for data in (
            dumps(changed(INTEL, "ts", "2020-11-26T14:46:52.123456")),
            dumps({**INTEL, "unknown": 1}),
            dumps(changed(SIGHTING, "context", None)),
        ):
            topic = "threatbus/sighting" if b'"intel":' in data else "threatbus/intel"
            message = codec.decode(topic, data)
            encoded = codec.encode(message)
            self.assertEqual(json.loads(encoded), codec.unstructure(message))
            self.assertNotEqual(json.loads(encoded), json.loads(data))

    def test_not_a_message(self):
        """Encoding something that is not a message is a TypeError."""
        self.assertRaises(TypeError, codec.encode, model.Subscription("threatbus"))


class DecodeErrorTests(SynchronousTestCase):
    """Malformed input raises DecodeError, with a message saying what is wrong."""

    def assertDecodeError(self, topic, data, *fragments, reason="malformed"):
        if not isinstance(data, bytes):
            data = dumps(data)
        e = self.assertRaises(codec.DecodeError, codec.decode, topic, data)
        for fragment in fragments:
            self.assertIn(fragment, str(e))
        self.assertEqual(e.reason, reason)
        return e

    def test_valid_bases(self):
        """The base messages these tests spoil are themselves valid."""
        for topic, value in (
            ("threatbus/intel", INTEL),
            ("threatbus/sighting", SIGHTING),
            ("threatbus/snapshotrequest", REQUEST),
            ("threatbus/snapshotenvelope", ENVELOPE),
        ):
            self.assertEqual(json.loads(codec.encode(codec.decode(topic, dumps(value)))), value)

    def test_is_value_error(self):
        """DecodeError is a ValueError."""
        self.assertTrue(issubclass(codec.DecodeError, ValueError))

    def test_reason_default(self):
        """A DecodeError made with a message alone has reason "malformed", and keeps it through pickling."""
        e = codec.DecodeError("bad")
        self.assertEqual((str(e), e.reason), ("bad", "malformed"))
        e = pickle.loads(pickle.dumps(codec.DecodeError("deep", reason="too_deep")))
        self.assertEqual((str(e), e.reason), ("deep", "too_deep"))

    def test_not_json(self):
        """Text that is not JSON."""
        self.assertDecodeError("threatbus/intel", b"not json", "invalid JSON")
        self.assertDecodeError("threatbus/intel", b"", "invalid JSON")
        self.assertDecodeError("threatbus/intel", b'{"ts": ', "invalid JSON")
        self.assertDecodeError("threatbus/intel", dumps(INTEL) + b" {}", "extra data")
        self.assertDecodeError("threatbus/intel", b"   ", "invalid JSON")

    def test_json_whitespace(self):
        """JSON's own whitespace around the value is allowed; other white space is not."""
        message = codec.decode("threatbus/intel", b" \t\r\n" + dumps(INTEL) + b"\n")
        self.assertEqual(codec.unstructure(message), INTEL)
        for space in ("\x0b", "\x0c", "\u00a0", "\u2028"):
            data = space.encode() + dumps(INTEL)
            self.assertDecodeError("threatbus/intel", data, "invalid JSON")
            self.assertRaises(ValueError, json.loads, data)

    def test_not_utf8(self):
        """Bytes that are not UTF-8, including UTF-16 JSON."""
        self.assertDecodeError("threatbus/intel", b"\xff\xfe\x00", "not UTF-8")
        self.assertDecodeError("threatbus/intel", b'{"ts": "\xc3"}', "not UTF-8")
        self.assertDecodeError("threatbus/intel", json.dumps(INTEL).encode("utf-16"), "not UTF-8")

    def test_not_json_numbers(self):
        """NaN, Infinity and numbers too large for a float are not JSON."""
        for bad in (b"NaN", b"-Infinity", b"1e400"):
            data = dumps(changed(INTEL, "data.confidence", 0)).replace(b'"confidence": 0', b'"confidence": ' + bad)
            self.assertIn(bad, data)
            self.assertDecodeError("threatbus/intel", data, "invalid JSON")

    def test_deeply_nested(self):
        """JSON nested too deeply for the parser."""
        self.assertDecodeError("threatbus/intel", b"[" * 100000, "nested too deeply", reason="too_deep")
        nested = dumps(SIGHTING).replace(b'"VAST"', b"[" * 100000 + b"]" * 100000)
        self.assertDecodeError("threatbus/sighting", nested, "nested too deeply", reason="too_deep")

    def test_not_an_object(self):
        """A JSON value that is not an object."""
        for value in ([INTEL], "x", 1, None, True):
            self.assertDecodeError("threatbus/intel", value, "Intel must be a JSON object")

    def test_missing_keys(self):
        """Each required key, missing, is named."""
        for topic, value, key in (
            ("threatbus/intel", INTEL, "ts"),
            ("threatbus/intel", INTEL, "id"),
            ("threatbus/intel", INTEL, "data"),
            ("threatbus/intel", INTEL, "operation"),
            ("threatbus/intel", INTEL, "data.indicator"),
            ("threatbus/intel", INTEL, "data.intel_type"),
            ("threatbus/sighting", SIGHTING, "ts"),
            ("threatbus/sighting", SIGHTING, "intel"),
            ("threatbus/snapshotrequest", REQUEST, "snapshot_type"),
            ("threatbus/snapshotrequest", REQUEST, "snapshot_id"),
            ("threatbus/snapshotrequest", REQUEST, "snapshot"),
            ("threatbus/snapshotenvelope", ENVELOPE, "snapshot_type"),
            ("threatbus/snapshotenvelope", ENVELOPE, "snapshot_id"),
            ("threatbus/snapshotenvelope", ENVELOPE, "body"),
            ("threatbus/snapshotenvelope", ENVELOPE, "body.id"),
        ):
            name = key.rsplit(".", 1)[-1]
            self.assertDecodeError(topic, changed(value, key, delete=True), f"Object missing required field `{name}`")

    def test_optional_sighting_keys(self):
        """A Sighting without context or ioc is valid: {} and None."""
        message = codec.decode(
            "threatbus/sighting",
            dumps(changed(changed(SIGHTING, "context", delete=True), "ioc", delete=True)),
        )
        self.assertEqual((message.context, message.ioc), ({}, None))

    def test_bool_for_int(self):
        """true is not a number, for any integer field."""
        self.assertDecodeError(
            "threatbus/intel", changed(INTEL, "data.intel_type", True), "Expected `int`, got `bool` - at `$.data.intel_type`"
        )
        for key in ("snapshot", "snapshot_type"):
            self.assertDecodeError(
                "threatbus/snapshotrequest", changed(REQUEST, key, True), f"Expected `int`, got `bool` - at `$.{key}`"
            )

    def test_string_intel_type(self):
        """intel_type given as a name or a numeric string."""
        for bad in ("DOMAIN", "11"):
            self.assertDecodeError(
                "threatbus/intel", changed(INTEL, "data.intel_type", bad), "Expected `int`, got `str` - at `$.data.intel_type`"
            )

    def test_intel_type_out_of_range(self):
        """intel_type 0 and 48 are not in the table."""
        for bad in (0, 48, -1):
            self.assertDecodeError(
                "threatbus/intel", changed(INTEL, "data.intel_type", bad), f"Invalid enum value {bad} - at `$.data.intel_type`"
            )

    def test_float_intel_type(self):
        """intel_type 11.0 is not an integer."""
        self.assertDecodeError(
            "threatbus/intel", changed(INTEL, "data.intel_type", 11.0), "Expected `int`, got `float` - at `$.data.intel_type`"
        )

    def test_unknown_operation(self):
        """An operation other than ADD or REMOVE, or in lower case."""
        for bad in ("EDIT", "add"):
            self.assertDecodeError(
                "threatbus/intel", changed(INTEL, "operation", bad), f"Invalid enum value {bad!r} - at `$.operation`"
            )
        self.assertDecodeError("threatbus/intel", changed(INTEL, "operation", 1), "Expected `str`, got `int` - at `$.operation`")

    def test_bad_ts(self):
        """A ts that is not a timestamp, or not a string."""
        for bad in ("yesterday", "2020-13-01 00:00:00", "", "\ud800"):
            self.assertDecodeError("threatbus/intel", changed(INTEL, "ts", bad), "Intel.ts is not a timestamp")
        self.assertDecodeError("threatbus/sighting", changed(SIGHTING, "ts", 1606402012), "Expected `str`, got `int` - at `$.ts`")

    def test_iso_ts(self):
        """An ISO 8601 ts with T and Z is accepted as UTC."""
        message = codec.decode("threatbus/intel", dumps(changed(INTEL, "ts", "2020-11-26T14:46:52Z")))
        self.assertEqual(message.ts, datetime(2020, 11, 26, 14, 46, 52, tzinfo=timezone.utc))
        message = codec.decode(
            "threatbus/sighting", dumps(changed(SIGHTING, "ts", "2020-11-26T14:46:52.5+01:00"))
        )
        self.assertEqual(message.ts, datetime(2020, 11, 26, 13, 46, 52, 500000, tzinfo=timezone.utc))

    def test_indicator_not_list(self):
        """An indicator that is a string or an object."""
        for bad in ("evil.example.com", {"a": 1}):
            self.assertDecodeError(
                "threatbus/intel", changed(INTEL, "data.indicator", bad), "Expected `array`, got", "at `$.data.indicator`"
            )

    def test_indicator_empty(self):
        """An empty indicator."""
        self.assertDecodeError("threatbus/intel", changed(INTEL, "data.indicator", []), "Expected `array` of length >= 1 - at `$.data.indicator`")

    def test_indicator_not_strings(self):
        """An indicator with a non-string."""
        for bad in ([1], ["a", None], [["a"]]):
            self.assertDecodeError(
                "threatbus/intel", changed(INTEL, "data.indicator", bad), "Expected `str`, got", "at `$.data.indicator["
            )

    def test_data_not_object(self):
        """Intel data that is not an object."""
        self.assertDecodeError("threatbus/intel", changed(INTEL, "data", ["x"]), "Expected `object`, got `array` - at `$.data`")

    def test_bad_sighting_fields(self):
        """A Sighting's context that is not an object, ioc that is not a list of strings."""
        self.assertDecodeError("threatbus/sighting", changed(SIGHTING, "context", [1]), "Expected `object | null`, got `array` - at `$.context`")
        self.assertDecodeError("threatbus/sighting", changed(SIGHTING, "ioc", "x"), "Expected `array | null`, got `str` - at `$.ioc`")
        self.assertDecodeError("threatbus/sighting", changed(SIGHTING, "ioc", [1]), "Expected `str`, got `int` - at `$.ioc[0]`")
        self.assertDecodeError("threatbus/sighting", changed(SIGHTING, "intel", 1), "Expected `str`, got `int` - at `$.intel`")

    def test_snapshot_not_int(self):
        """A snapshot given as a string or a float."""
        self.assertDecodeError(
            "threatbus/snapshotrequest", changed(REQUEST, "snapshot", "30"), "Expected `int`, got `str` - at `$.snapshot`"
        )
        self.assertDecodeError(
            "threatbus/snapshotrequest", changed(REQUEST, "snapshot", 1.5), "Expected `int`, got `float` - at `$.snapshot`"
        )

    def test_snapshot_not_positive(self):
        """A snapshot of 0 or fewer seconds."""
        for bad in (0, -1):
            self.assertDecodeError(
                "threatbus/snapshotrequest", changed(REQUEST, "snapshot", bad),
                "SnapshotRequest: Expected `int` >= 1 - at `$.snapshot`",
            )

    def test_huge_snapshot(self):
        """A snapshot too large for a duration."""
        for bad in (10**20, 10**15):
            self.assertDecodeError(
                "threatbus/snapshotrequest", changed(REQUEST, "snapshot", bad),
                "SnapshotRequest: Expected `int` <= 86399999999999 - at `$.snapshot`",
            )
        self.assertDecodeError(
            "threatbus/snapshotrequest", changed(REQUEST, "snapshot", -(10**20)),
            "SnapshotRequest: Expected `int` >= 1 - at `$.snapshot`",
        )

    def test_unknown_snapshot_type(self):
        """A snapshot_type other than 1 or 2."""
        for topic, value in (("threatbus/snapshotrequest", REQUEST), ("threatbus/snapshotenvelope", ENVELOPE)):
            self.assertDecodeError(topic, changed(value, "snapshot_type", 3), "Invalid enum value 3 - at `$.snapshot_type`")

    def test_envelope_wrong_body(self):
        """An envelope whose body is not what its snapshot_type says, or malformed."""
        self.assertDecodeError(
            "threatbus/snapshotenvelope", changed(ENVELOPE, "snapshot_type", 2),
            "SnapshotEnvelope.body (snapshot_type SIGHTING)", "Sighting: Object missing required field `intel`",
        )
        self.assertDecodeError(
            "threatbus/snapshotenvelope", changed(ENVELOPE, "body", SIGHTING),
            "SnapshotEnvelope.body (snapshot_type INTEL)", "Intel: Object missing required field",
        )
        self.assertDecodeError(
            "threatbus/snapshotenvelope", changed(ENVELOPE, "body.data.intel_type", 0),
            "SnapshotEnvelope.body", "Invalid enum value 0 - at `$.data.intel_type`",
        )
        self.assertDecodeError(
            "threatbus/snapshotenvelope", changed(ENVELOPE, "body", [INTEL]), "body (snapshot_type INTEL): Intel must be a JSON object, not list"
        )

    def test_unknown_topic(self):
        """A topic that carries no message, including a false prefix."""
        for topic in ("threatbus/intelX", "threatbus", "threatbus/", "", "intel"):
            self.assertDecodeError(topic, dumps(INTEL), "unknown topic " + repr(topic))


def refused(data, reason):
    """The DecodeError that ``codec.loads(data)`` raises, if its reason is ``reason``."""
    try:
        codec.loads(data)
    except codec.DecodeError as e:
        if e.reason != reason:
            raise
        return e
    raise AssertionError(f"decoded: {data[:60]!r}")


class DuplicateKeyTests(SynchronousTestCase):
    """A JSON object that names a key twice is refused, at any depth, with reason "duplicate_key"."""

    def assertDuplicate(self, data, key):
        e = refused(data, "duplicate_key")
        self.assertIn(f"duplicate key {key!r}", str(e))

    def test_top_level(self):
        """Two operations at the top level, with different and with equal values."""
        self.assertDuplicate(b'{"operation": "REMOVE", "operation": "ADD"}', "operation")
        self.assertDuplicate(b'{"operation": "ADD", "operation": "ADD"}', "operation")

    def test_nested_in_data(self):
        """A duplicate in an intel's data, with different and with equal values."""
        for second in (b"1", b"11"):
            data = dumps(INTEL).replace(b'"intel_type": 11', b'"intel_type": 11, "intel_type": ' + second)
            self.assertDuplicate(data, "intel_type")

    def test_in_array(self):
        """A duplicate in an object inside arrays, deep in the value."""
        self.assertDuplicate(b'[1, [{"a": [], "b": {}}, {"x": null, "y": 0, "x": null}]]', "x")

    def test_escaped_spelling(self):
        """A key spelled once plainly and once with JSON escapes is the same key."""
        self.assertDuplicate(b'{"a": 1, "\\u0061": 2}', "a")
        self.assertDuplicate(b'{"\\u00e9": 1, "\xc3\xa9": 1}', "\u00e9")
        self.assertDuplicate(b'{"a/b": 1, "a\\/b": 1}', "a/b")

    def test_same_key_in_different_objects(self):
        """One key in many objects, nested or side by side, is no duplicate."""
        value = {"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}], "c": {"b": {"a": {}}}}
        self.assertEqual(codec.loads(dumps(value)), value)

    def test_decode_intel(self):
        """decode refuses a full intel with a duplicate key, and one in a snapshot envelope's body."""
        data = dumps(INTEL).replace(b'"operation": "ADD"', b'"operation": "REMOVE", "operation": "ADD"')
        e = self.assertRaises(codec.DecodeError, codec.decode, "threatbus/intel", data)
        self.assertEqual((e.reason, str(e)), ("duplicate_key", "invalid JSON: duplicate key 'operation'"))
        data = dumps(ENVELOPE).replace(b'"id": "intel-1"', b'"id": "intel-1", "id": "intel-2"')
        e = self.assertRaises(codec.DecodeError, codec.decode, "threatbus/snapshotenvelope", data)
        self.assertEqual(e.reason, "duplicate_key")


def arrays(depth: int) -> bytes:
    """Arrays nested ``depth`` deep."""
    return b"[" * depth + b"]" * depth


def objects(depth: int) -> bytes:
    """Objects nested ``depth`` deep."""
    return b'{"a": ' * (depth - 1) + b"{}" + b"}" * (depth - 1)


def mixed(depth: int) -> bytes:
    """Arrays and objects in turn, with siblings, nested ``depth`` deep."""
    opening, closing = [], []
    for level in range(depth - 1):
        if level % 2:
            opening.append(b'[1, "x", ')
            closing.append(b"]")
        else:
            opening.append(b'{"k": 2, "v": ')
            closing.append(b', "z": null}')
    return b"".join(opening) + b"[]" + b"".join(reversed(closing))


def depth(value) -> int:
    """How deep ``value`` nests arrays and objects."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


class DepthTests(SynchronousTestCase):
    """Arrays and objects nest at most MAX_DEPTH deep; deeper is refused with reason "too_deep"."""

    def test_max_depth(self):
        """The limit is 64."""
        self.assertEqual(codec.MAX_DEPTH, 64)

    def test_at_limit(self):
        """Arrays, objects and both mixed, exactly MAX_DEPTH deep, decode and encode again."""
        for nest in (arrays, objects, mixed):
            self.assertFalse(codec.is_too_deep(nest(codec.MAX_DEPTH).decode()), nest.__name__)
            value = codec.loads(nest(codec.MAX_DEPTH))
            self.assertEqual(depth(value), codec.MAX_DEPTH, nest.__name__)
            self.assertEqual(json.loads(json.dumps(value)), value)

    def test_over_limit(self):
        """Arrays, objects and both mixed, one deeper than MAX_DEPTH, are refused."""
        for nest in (arrays, objects, mixed):
            self.assertTrue(codec.is_too_deep(nest(codec.MAX_DEPTH + 1).decode()), nest.__name__)
            e = refused(nest(codec.MAX_DEPTH + 1), "too_deep")
            self.assertEqual(str(e), "JSON nested too deeply: more than 64 levels")

    def test_far_over_limit(self):
        """100,000 deep, closed or not, is refused before parsing (no RecursionError)."""
        for data in (arrays(100000), b"[" * 100000, objects(100000), b'{"a":' * 100000, mixed(100000)):
            self.assertIn("more than 64 levels", str(refused(data, "too_deep")))
        self.assertIn("more than 64 levels", str(refused(b"[{" * 50000, "too_deep")))

    def test_unclosed(self):
        """Left open, MAX_DEPTH deep is malformed, one deeper is too deep."""
        refused(b"[" * codec.MAX_DEPTH, "malformed")
        refused(b"[" * (codec.MAX_DEPTH + 1), "too_deep")

    def test_many_shallow(self):
        """Many brackets side by side are not deep."""
        value = [[]] * 1000 + [{"a": [{}]}] * 1000
        self.assertEqual(codec.loads(dumps(value)), value)

    def test_brackets_in_strings(self):
        """Brackets in strings and keys do not count, even after escaped quotes."""
        for text in ("[" * 1000, "{" * 1000, '"' + "[" * 1000, '\\"[{' * 1000, "\\" * 5 + '"[' * 100):
            value = [{text: text}] * 2
            self.assertEqual(codec.loads(dumps(value)), value)
            self.assertEqual(codec.loads(json.dumps(value, ensure_ascii=False).encode()), value)

    def test_brackets_after_escaped_backslash(self):
        """A quote after an escaped backslash ends the string: the brackets after it count."""
        refused(b'["\\\\", ' + arrays(64) + b"]", "too_deep")
        refused(b'["\\\\\\\\", ' + arrays(64) + b"]", "too_deep")
        value = codec.loads(b'["\\\\", ' + arrays(63) + b"]")
        self.assertEqual(depth(value), 64)

    def test_string_left_open(self):
        """Brackets after a string left open are in it: malformed, not too deep."""
        refused(b'["' + arrays(100), "malformed")

    def test_encodes(self):
        """A message as deep as decodes also encodes; 980 deep, which json.dumps could not encode, is refused."""
        data = dumps(SIGHTING).replace(b'"VAST"', arrays(codec.MAX_DEPTH - 2))
        message = codec.decode("threatbus/sighting", data)
        self.assertEqual(json.loads(codec.encode(message)), json.loads(data))
        data = dumps(SIGHTING).replace(b'"VAST"', arrays(980))
        e = self.assertRaises(codec.DecodeError, codec.decode, "threatbus/sighting", data)
        self.assertEqual(e.reason, "too_deep")


# --- property tests

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
_message_keys = st.sampled_from(
    ["ts", "id", "data", "operation", "indicator", "intel_type", "intel", "context", "ioc",
     "snapshot_type", "snapshot_id", "snapshot", "body"]
)
# Objects with the real keys, so that decoding gets past the first lookups.
message_like = st.recursive(
    st.dictionaries(_message_keys, _json_scalars, max_size=8),
    lambda children: st.dictionaries(_message_keys, children | json_values, max_size=8),
    max_leaves=30,
)

# Offsets in whole seconds: CPython's fromisoformat drops microseconds of an
# offset, and no real clock has one.
_offsets = st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
).map(lambda d: timedelta(seconds=d // timedelta(seconds=1)))
timestamps = st.datetimes(timezones=st.none() | _offsets.map(timezone))
strings = st.text(max_size=20)
extra = st.dictionaries(
    strings.filter(lambda k: k not in ("indicator", "intel_type")), json_values, max_size=4
)
intels = st.builds(
    Intel,
    ts=timestamps,
    id=strings,
    data=st.builds(
        IntelData,
        indicator=st.lists(strings, min_size=1, max_size=3),
        intel_type=st.sampled_from(IntelType),
        extra=extra,
    ),
    operation=st.sampled_from(Operation),
)
sightings = st.builds(
    Sighting,
    ts=timestamps,
    intel=strings,
    context=st.dictionaries(strings, json_values, max_size=4),
    ioc=st.none() | st.lists(strings, max_size=3),
)
requests = st.builds(
    SnapshotRequest,
    snapshot_type=st.sampled_from(MessageType),
    snapshot_id=strings,
    snapshot=st.integers(min_value=1, max_value=999_999_999 * 86400).map(lambda s: timedelta(seconds=s)),
)
envelopes = st.one_of(
    st.builds(SnapshotEnvelope, st.just(MessageType.INTEL), strings, intels),
    st.builds(SnapshotEnvelope, st.just(MessageType.SIGHTING), strings, sightings),
)

messages = st.one_of(intels, sightings, requests, envelopes)


def _slots(value):
    """Every (object, key) pair in a JSON value, outermost first."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield value, key
            yield from _slots(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _slots(inner)


class PropertyTests(SynchronousTestCase):
    """Properties over generated input."""

    def decode_or_error(self, topic, data):
        try:
            message = codec.decode(topic, data)
        except codec.DecodeError as e:
            self.assertTrue(str(e))
            return None
        self.assertIsInstance(message, model.BY_TOPIC[topic])
        return message

    @settings(max_examples=300, deadline=None)
    @given(topic=st.sampled_from(TOPICS), data=st.binary(max_size=200))
    def test_arbitrary_bytes(self, topic, data):
        """Arbitrary bytes raise only DecodeError, for every topic."""
        self.decode_or_error(topic, data)

    @settings(max_examples=300, deadline=None)
    @given(topic=st.sampled_from(TOPICS), value=json_values)
    def test_arbitrary_json(self, topic, value):
        """Arbitrary JSON values raise only DecodeError, for every topic."""
        self.decode_or_error(topic, dumps(value))

    @settings(max_examples=150, deadline=None)
    @given(topic=st.sampled_from(TOPICS), value=message_like)
    def test_message_like_json(self, topic, value):
        """Objects with the messages' keys but any values raise only DecodeError, or decode."""
        message = self.decode_or_error(topic, dumps(value))
        if message is not None:
            self.assertEqual(codec.decode(topic, codec.encode(message)), message)

    @settings(max_examples=300, deadline=None)
    @given(message=messages, data=st.data())
    def test_spoiled_messages(self, message, data):
        """A valid message with one key changed to any JSON value, or deleted, raises only DecodeError."""
        value = json.loads(codec.encode(message))
        slots = list(_slots(value))
        container, key = data.draw(st.sampled_from(slots))
        if data.draw(st.booleans()):
            del container[key]
        else:
            container[key] = data.draw(json_values)
        decoded = self.decode_or_error(message.topic, dumps(value))
        if decoded is not None:
            # What decodes is valid: it survives encoding (defaults filled in).
            self.assertEqual(codec.decode(message.topic, codec.encode(decoded)), decoded)
            self.assertEqual(json.loads(codec.encode(decoded)), codec.unstructure(decoded))

    @settings(max_examples=500, deadline=None)
    @given(
        ts=st.datetimes(timezones=st.none() | st.timezones()),
        sep=st.sampled_from([" ", "T"]),
        timespec=st.sampled_from(["auto", "hours", "minutes", "seconds", "milliseconds", "microseconds"]),
        zero_micro=st.booleans(),
    )
    def test_ts_encoding(self, ts, sep, timespec, zero_micro):
        """is_ts_encoding says, of any ISO text and the time parsed from it, whether the text is str(time)."""
        if zero_micro:
            ts = ts.replace(microsecond=0)
        raw = ts.isoformat(sep, timespec=timespec)
        parsed = datetime.fromisoformat(raw)
        self.assertEqual(codec.is_ts_encoding(raw, parsed), raw == str(parsed))

    @settings(max_examples=300, deadline=None)
    @given(
        message=st.one_of(intels, sightings),
        ts_form=st.sampled_from(["str", "T", "Z", "micro"]),
        unknown_key=st.booleans(),
        null_context=st.booleans(),
    )
    def test_kept_input_is_the_encoding(self, message, ts_form, unknown_key, null_context):
        """Input kept as a message's encoding is exactly its encoding, whatever form it came in."""
        value = codec.unstructure(message)
        ts = message.ts
        value["ts"] = {
            "str": str(ts),
            "T": ts.isoformat(),
            "Z": ts.replace(tzinfo=None).isoformat() + "Z",
            "micro": ts.isoformat(" ", timespec="microseconds"),
        }[ts_form]
        if unknown_key:
            value["unknown"] = 1
        if null_context and "context" in value:
            value["context"] = None
        data = dumps(value)
        decoded = codec.decode(message.topic, data)
        self.assertEqual(
            codec.encode(decoded) is data or None, codec.unstructure(decoded) == value or None
        )
        self.assertEqual(json.loads(codec.encode(decoded)), codec.unstructure(decoded))

    @settings(max_examples=200, deadline=None)
    @given(message=messages)
    def test_round_trip(self, message):
        """A valid message decodes from its own encoding to an equal message."""
        decoded = codec.decode(message.topic, codec.encode(message))
        self.assertEqual(decoded, message)
        self.assertIsNot(decoded, message)
        self.assertEqual(json.loads(codec.encode(decoded)), json.loads(codec.encode(message)))


# Strings rich in what a depth scan must not miscount: brackets, quotes,
# backslashes (and what follows them in escapes).
_tricky_text = st.text(st.sampled_from('[]{}"\\/u0a \u00e9\u2028'), max_size=12) | st.text(max_size=12)
_tricky_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _tricky_text
)
tricky_values = st.recursive(
    _tricky_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_tricky_text, children, max_size=4),
    max_leaves=20,
)


def _wrap(inner, wrappers):
    """``inner`` in an array or object per wrapper (in_array, key, sibling), innermost first."""
    value = inner
    for in_array, key, sibling in wrappers:
        if in_array:
            value = [value] if sibling is None else [sibling, value]
        else:
            value = {key: value} if sibling is None else {key + "x": sibling, key: value}
    return value


_wrapper = st.tuples(st.booleans(), _tricky_text, st.none() | _tricky_scalars)
# A JSON value wrapped in up to 70 arrays and objects, some with siblings;
# often about MAX_DEPTH deep.
nested_values = st.builds(
    _wrap,
    tricky_values,
    st.lists(_wrapper, max_size=70) | st.lists(_wrapper, min_size=58, max_size=70),
)


class LoadsPropertyTests(SynchronousTestCase):
    """Properties of loads over generated JSON."""

    @settings(max_examples=200, deadline=None)
    @given(value=nested_values, ensure_ascii=st.booleans())
    def test_round_trip_or_too_deep(self, value, ensure_ascii):
        """Any JSON value (keys unique) within MAX_DEPTH loads back equal; deeper is refused as too deep."""
        data = json.dumps(value, ensure_ascii=ensure_ascii).encode()
        if depth(value) <= codec.MAX_DEPTH:
            self.assertEqual(codec.loads(data), value)
        else:
            refused(data, "too_deep")
        self.assertEqual(codec.is_too_deep(data.decode()), depth(value) > codec.MAX_DEPTH)

    @settings(max_examples=200, deadline=None)
    @given(value=nested_values, data=st.data())
    def test_tampered_never_too_deep(self, value, data):
        """JSON with characters inserted still never loads a value deeper than MAX_DEPTH."""
        text = json.dumps(value)
        for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
            at = data.draw(st.integers(min_value=0, max_value=len(text)))
            text = text[:at] + data.draw(st.sampled_from(['"', "\\", "[", "{", "]", "}", '\\"'])) + text[at:]
        try:
            loaded = codec.loads(text.encode())
        except codec.DecodeError as e:
            self.assertIn(e.reason, ("malformed", "too_deep", "duplicate_key"))
        else:
            self.assertLessEqual(depth(loaded), codec.MAX_DEPTH)
