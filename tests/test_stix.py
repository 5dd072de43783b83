"""
The STIX-2 generation's messages and patterns, held to the golden vectors
recorded from Threat Bus 2022.5.16 (stix2 3.0.1, stix2-patterns 1.3.0): what
upstream accepts we accept (with a few deliberate, listed deviations), the
bytes of an accepted object travel unchanged, and the point-equality fast
path never accepts what the full pattern parser refuses.
"""

from __future__ import annotations

import json
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stix2patterns.validator import run_validator
from twisted.trial.unittest import SynchronousTestCase

from tests.vectors import STIX_VECTORS
from txthreatbus import bridge, codec, patterns, stix
from txthreatbus.model import IntelData, IntelType, MessageType, SnapshotEnvelope, SnapshotRequest

IND_ID = "indicator--6911104f-c504-4086-a15b-05e28cf73435"
SIG_ID = "sighting--4a9e2a33-7bd4-4a16-8f5e-5b2c3d1a0f77"

#: Objects vectors where our verdict deliberately differs from upstream's,
#: by description.
DEVIATIONS = {
    # (a) upstream fills a missing id with a random uuid4; the bus forwards
    # the bytes an app sent and needs ids that are the same on every
    # instance, so an object without an id is refused.
    "Indicator without id (filled with uuid4(), frozen here)",
    "Indicator with only type, spec_version, pattern, pattern_type",
    "Sighting without id (filled with uuid4(), frozen here)",
    # (b) pattern_version "2.0" selects stix2-patterns' 2.0 grammar, whose
    # START/STOP syntax differs between the stix2-patterns upstream pins
    # (1.3.0) and the 2.x we use: the two verdicts swap.
    "valid 2.1 START/STOP pattern but pattern_version 2.0: validated by the 2.0 grammar",
    "STIX 2.0 START/STOP syntax with pattern_version 2.0: accepted",
}

#: Vector categories that name the StixError reason of a refusal.
REASON_CATEGORIES = {"spec_version", "unknown_type", "bundle", "invalid_pattern"}


def verdict(data: bytes):
    """``(accepted, reason)`` of ``codec.decode_stix`` on ``data``."""
    try:
        codec.decode_stix(data)
    except codec.DecodeError as e:
        return False, e.reason
    return True, None


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class ObjectVectorTests(SynchronousTestCase):
    """Objects on stix2/ topics: our verdict is upstream's, but for the listed deviations."""

    def test_there_are_vectors(self):
        """The vectors hold objects upstream accepts and objects it refuses, and every deviation is one of them."""
        verdicts = {e["upstream_accepts"] for e in STIX_VECTORS["objects"]}
        self.assertEqual(verdicts, {True, False})
        descriptions = {e["description"] for e in STIX_VECTORS["objects"]}
        self.assertEqual(DEVIATIONS - descriptions, set())

    def test_verdicts(self):
        """Every object vector not listed as a deviation gets upstream's verdict."""
        for entry in STIX_VECTORS["objects"]:
            if entry["description"] in DEVIATIONS:
                continue
            accepted, reason = verdict(entry["json"].encode("utf-8"))
            self.assertEqual(accepted, entry["upstream_accepts"], (entry["description"], reason))

    def test_deviations(self):
        """Each listed deviation does deviate: the verdict is the opposite of upstream's."""
        for entry in STIX_VECTORS["objects"]:
            if entry["description"] in DEVIATIONS:
                accepted, _ = verdict(entry["json"].encode("utf-8"))
                self.assertEqual(accepted, not entry["upstream_accepts"], entry["description"])

    def test_objects_without_id_refused(self):
        """An Indicator or Sighting without id is refused as malformed, naming the id."""
        for entry in STIX_VECTORS["objects"]:
            value = json.loads(entry["json"]) if is_json(entry["json"]) else None
            if type(value) is dict and value.get("type") in ("indicator", "sighting") and "id" not in value:
                with self.assertRaises(codec.DecodeError) as caught:
                    codec.decode_stix(entry["json"].encode("utf-8"))
                self.assertEqual(caught.exception.reason, "stix_malformed", entry["description"])
                self.assertIn("'id'", str(caught.exception))

    def test_refusal_reasons(self):
        """A refused JSON value carries a stix_ reason, that of its category where the category is one."""
        for entry in STIX_VECTORS["objects"]:
            accepted, reason = verdict(entry["json"].encode("utf-8"))
            if accepted:
                continue
            if not is_json(entry["json"]):
                # not JSON at all: refused before any STIX reading, as 2020 messages are
                self.assertEqual(reason, "malformed", entry["description"])
                continue
            self.assertTrue(reason.startswith("stix_"), (entry["description"], reason))
            if entry["category"] in REASON_CATEGORIES:
                self.assertEqual(reason, "stix_" + entry["category"], entry["description"])

    def test_accepted_keep_their_bytes(self):
        """An accepted object encodes to the very bytes it came in, and unstructures to their JSON value."""
        bodies = [e["json"] for e in STIX_VECTORS["objects"]]
        bodies += [e["input"] for e in STIX_VECTORS["encodings"] if "input" in e]
        checked = 0
        for text in bodies:
            data = text.encode("utf-8")
            if not verdict(data)[0]:
                continue
            obj = codec.decode_stix(data)
            self.assertEqual(codec.encode(obj), data)
            self.assertEqual(codec.unstructure(obj), json.loads(data))
            self.assertEqual(stix.unstructure(obj), json.loads(data))
            checked += 1
        self.assertGreater(checked, 30)

    def test_unstructure_is_stix_order(self):
        """unstructure lists an object's properties in STIX's order, whatever order they came in."""
        (entry,) = [e for e in STIX_VECTORS["encodings"] if e["description"].startswith("keys in reverse order")]
        obj = codec.decode_stix(entry["input"].encode("utf-8"))
        self.assertEqual(list(codec.unstructure(obj))[:3], ["type", "spec_version", "id"])

    def test_upstream_forwarded_accepted(self):
        """What upstream forwards for an object it accepted is accepted here too (its ids are filled in)."""
        for entry in STIX_VECTORS["objects"]:
            if entry["upstream_accepts"] and not entry["description"].startswith("STIX 2.0 START/STOP"):
                self.assertTrue(verdict(entry["forwarded"].encode("utf-8"))[0], entry["description"])


class EncodingVectorTests(SynchronousTestCase):
    """The 2022 snapshot messages and STIX objects as upstream's encoders write them."""

    def entries(self, kind):
        found = [e for e in STIX_VECTORS["encodings"] if e["kind"] == kind]
        self.assertTrue(found, kind)
        return found

    def test_snapshot_requests(self):
        """A request of a positive whole number of seconds encodes to upstream's exact string."""
        checked = 0
        for entry in self.entries("snapshotrequest"):
            value = entry["value"]
            if value["snapshot"] <= 0:
                continue  # upstream sends these; the bus never asks for them
            request = SnapshotRequest(
                MessageType(value["snapshot_type"]), value["snapshot_id"], timedelta(seconds=value["snapshot"])
            )
            self.assertEqual(codec.encode_2022_request(request), entry["json"].encode("utf-8"), entry["description"])
            checked += 1
        self.assertGreaterEqual(checked, 2)

    def test_2022_request_is_not_2020(self):
        """The 2022 encoding of a request is the 2020 one with "type": "snapshotrequest" added."""
        request = SnapshotRequest(MessageType.INTEL, "8dcaaba4", timedelta(days=1))
        value = json.loads(codec.encode_2022_request(request))
        self.assertEqual(value, {"type": "snapshotrequest", **json.loads(codec.encode(request))})
        self.assertNotIn("type", json.loads(codec.encode(request)))

    def test_snapshot_envelopes(self):
        """A 2022 envelope decodes to an envelope of a STIX body that unstructures to its JSON value."""
        for entry in self.entries("snapshotenvelope"):
            envelope = codec.decode("threatbus/snapshotenvelope", entry["json"].encode("utf-8"))
            self.assertIsInstance(envelope, SnapshotEnvelope)
            self.assertIsInstance(envelope.body, stix.StixObject)
            self.assertEqual(envelope.snapshot_type, MessageType(entry["value"]["snapshot_type"]))
            self.assertEqual(codec.unstructure(envelope), entry["value"])
            self.assertEqual(json.loads(codec.encode(envelope.body)), entry["value"]["body"])

    def test_envelope_body_of_wrong_type(self):
        """A 2022 envelope whose body is not of its snapshot_type is refused."""
        (entry,) = [e for e in self.entries("snapshotenvelope") if e["description"] == "envelope with a Sighting body"]
        value = json.loads(entry["json"])
        value["snapshot_type"] = MessageType.INTEL.value
        self.assertRaises(
            codec.DecodeError, codec.decode, "threatbus/snapshotenvelope", json.dumps(value).encode("utf-8")
        )

    def test_app_objects(self):
        """Both what an app publishes and what upstream forwards of it are accepted, as the same type."""
        for kind, cls in (("indicator", stix.Indicator), ("sighting", stix.Sighting)):
            for entry in self.entries(kind):
                for text in (entry["input"], entry["json"]):
                    obj = codec.decode_stix(text.encode("utf-8"))
                    self.assertIsInstance(obj, cls, entry["description"])
                    self.assertEqual(obj.topic, "stix2/" + kind)


class PatternVectorTests(SynchronousTestCase):
    """patterns.validate and patterns.point agree with stix2-patterns on every recorded pattern."""

    def test_validate(self):
        """validate accepts exactly the patterns stix2-patterns finds valid."""
        for entry in STIX_VECTORS["patterns"]:
            if entry["valid"]:
                patterns.validate(entry["pattern"])
            else:
                self.assertRaises(patterns.PatternError, patterns.validate, entry["pattern"])

    def test_point(self):
        """point gives (object path, value) of exactly the valid point-equality patterns."""
        for entry in STIX_VECTORS["patterns"]:
            if not entry["valid"]:
                continue
            expected = (entry["object_path"], entry["value"]) if entry["point_equality"] else None
            self.assertEqual(patterns.point(entry["pattern"]), expected, entry["pattern"])

    def test_intel_types(self):
        """Each 2020 IntelType's indicator gives the recorded pattern, or None where the table has none."""
        for entry in STIX_VECTORS["intel_types"]:
            data = IntelData(tuple(entry["indicator"]), IntelType[entry["intel_type"]])
            self.assertEqual(bridge.intel_pattern(data), entry["pattern"], entry)

    def test_inverse(self):
        """Each valid recorded pattern gives its recorded IntelType and indicator, or none."""
        checked = 0
        for entry in STIX_VECTORS["inverse"]:
            try:
                patterns.validate(entry["pattern"])
            except patterns.PatternError:
                # recorded as having no IntelType, and invalid as stix2-patterns has it
                self.assertIsNone(entry["intel_type"], entry)
                self.assertNotIn(entry["pattern"], [p["pattern"] for p in STIX_VECTORS["patterns"] if p["valid"]])
                continue
            indicator = stix.Indicator(id=IND_ID, pattern=entry["pattern"], pattern_type="stix")
            data, reason = bridge.intel_data(indicator)
            if entry["intel_type"] is None:
                self.assertIsNone(data, entry)
                self.assertIn(reason, ("not_point_equality", "object_path"))
            else:
                self.assertIsNone(reason)
                self.assertEqual(
                    (data.intel_type, list(data.indicator)),
                    (IntelType[entry["intel_type"]], entry["indicator"]),
                    entry,
                )
            checked += 1
        self.assertGreater(checked, 50)


#: Object paths without hashes (whose values have a format to meet), in
#: their plainest spelling.
PLAIN_PATHS = (
    "domain-name:value",
    "ipv4-addr:value",
    "ipv6-addr:value",
    "url:value",
    "email-addr:value",
    "file:name",
    "software:name",
    "x-custom-type:x_prop",
    "file:extensions.'windows-pebinary-ext'.imphash",
)


#: Path components that random identifiers seldom are: keywords (in any
#: case), hash selectors, and names of one letter that prefix literals.
_TRICKY = (
    "hashes", "MD5", "md5", "'MD5'", "SHA256", "'SHA-256'", "'sha-256'", "'SHA-1'", "SSDEEP", "'SSDEEP'",
    "TLSH", "AND", "and", "Or", "NOT", "LIKE", "MATCHES", "IN", "EXISTS", "START", "STOP", "WITHIN",
    "true", "FALSE", "t", "h", "b", "value", "_",
)
_components = st.one_of(
    st.from_regex(patterns._IDENTIFIER_RE, fullmatch=True),
    st.sampled_from(_TRICKY),
    st.from_regex(r"'[A-Za-z0-9_-]+'", fullmatch=True),
)
_values = st.one_of(
    st.from_regex(patterns.STRING, fullmatch=True),
    st.text("0123456789abcdefABCDEFxyz/+:.", max_size=140).map(patterns.quote),
    st.sampled_from(["d41d8cd98f00b204e9800998ecf8427e", "da39a3ee5e6b4b0d3255bfef95601890afd80709"]).map(
        patterns.quote
    ),
)
#: Point-equality shapes: the regular expression's own strings, and ones
#: built from tricky parts.
point_shapes = st.one_of(
    st.from_regex(patterns._POINT, fullmatch=True),
    st.builds(
        lambda object_type, first, rest, value: f"[{object_type}:{'.'.join([first, *rest])} = {value}]",
        st.one_of(st.sampled_from(["file", "x509-certificate", "and", "in", "true", "x-a-b"]),
                  st.from_regex(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*", fullmatch=True)),
        st.one_of(st.from_regex(patterns._IDENTIFIER_RE, fullmatch=True), st.sampled_from(_TRICKY[:-4])),
        st.lists(_components, max_size=3),
        _values,
    ),
    st.builds(
        lambda object_type, algorithm, value: f"[{object_type}:hashes.{algorithm} = {value}]",
        st.sampled_from(["file", "x509-certificate", "artifact"]),
        st.sampled_from(_TRICKY[1:10]),
        _values,
    ),
)


class PatternPropertyTests(SynchronousTestCase):
    """The fast path is a strict subset of the grammar, and point_pattern / point are inverses."""

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(point_shapes)
    def test_fast_path_is_sound(self, pattern):
        """Whatever the fast path accepts on its own, the full parser finds valid."""
        match = patterns._POINT.fullmatch(pattern)
        if match is not None and patterns._plain_point(match):
            self.assertEqual(run_validator(pattern, "2.1"), [], pattern)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(PLAIN_PATHS), st.text())
    def test_round_trip(self, path, value):
        """point_pattern of any value on a plain path is valid, and point gives back path and value."""
        pattern = patterns.point_pattern(path, value)
        patterns.validate(pattern)
        self.assertEqual(patterns.point(pattern), (path, value))
        self.assertEqual(run_validator(pattern, "2.1"), [], pattern)

    def test_fast_path_leaves_keywords_to_the_parser(self):
        """A point-equality shape with a keyword as a path component is judged by the parser, which refuses it."""
        pattern = "[x-thing:value.AND = 'a']"
        self.assertIsNotNone(patterns._POINT.fullmatch(pattern))
        self.assertFalse(patterns._plain_point(patterns._POINT.fullmatch(pattern)))
        self.assertRaises(patterns.PatternError, patterns.validate, pattern)

    def test_fast_path_checks_hashes(self):
        """A point-equality hash of the wrong format is refused, as stix2-patterns refuses it."""
        for pattern in ("[file:hashes.MD5 = 'abc']", "[file:hashes.'SHA-256' = 'zz']", "[file:hashes.md5 = 'x']"):
            self.assertRaises(patterns.PatternError, patterns.validate, pattern)
        patterns.validate("[file:hashes.MD5 = 'd41d8cd98f00b204e9800998ecf8427e']")

    def test_quote(self):
        """quote escapes backslashes and quotes; unquote undoes it."""
        self.assertEqual(patterns.quote("o'r\\x"), "'o\\'r\\\\x'")
        self.assertEqual(patterns.unquote(patterns.quote("o'r\\x")), "o'r\\x")


class PatternLimitTests(SynchronousTestCase):
    """No pattern holds the reactor for long or crashes the validator."""

    def test_long_pattern_not_parsed(self):
        """A pattern over MAX_PARSED_LENGTH that is not point equality is refused without running the parser."""
        called = []
        self.patch(patterns._library(), "run_validator", lambda *args: called.append(args) or [])
        clause = "domain-name:value = 'a.example'"
        pattern = "[" + " OR ".join([clause] * (patterns.MAX_PARSED_LENGTH // len(clause) + 1)) + "]"
        self.assertGreater(len(pattern), patterns.MAX_PARSED_LENGTH)
        with self.assertRaises(patterns.PatternError) as caught:
            patterns.validate(pattern)
        self.assertIn(str(patterns.MAX_PARSED_LENGTH), str(caught.exception))
        self.assertEqual(called, [])
        self.assertIsNone(patterns.point(pattern))

    def test_long_point_equality_accepted(self):
        """A point-equality pattern over MAX_PARSED_LENGTH is still valid: the fast path needs no parser."""
        self.patch(patterns._library(), "run_validator", lambda *args: self.fail("the parser ran"))
        value = "a" * (patterns.MAX_PARSED_LENGTH + 1)
        pattern = patterns.point_pattern("url:value", value)
        patterns.validate(pattern)
        self.assertEqual(patterns.point(pattern), ("url:value", value))

    def test_library_loads_when_needed(self):
        """Importing the bus does not load stix2-patterns (nor ANTLR): a 2020-only bus never carries it."""
        import subprocess
        import sys

        code = "import sys, txthreatbus.tap; print(sorted(m for m in sys.modules if m.startswith(('stix2patterns', 'antlr4'))))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        self.assertEqual(out, "[]\n")

    def test_deep_nesting(self):
        """A pattern nested 2000 deep (within MAX_PARSED_LENGTH) is refused with a PatternError, not a crash."""
        pattern = "(" * 2000 + "[a:b = 'c']" + ")" * 2000
        self.assertLessEqual(len(pattern), patterns.MAX_PARSED_LENGTH)
        self.assertRaises(patterns.PatternError, patterns.validate, pattern)
        self.assertIsNone(patterns.point(pattern))

    def test_deep_nesting_in_an_object(self):
        """An Indicator with a deeply nested pattern is refused as an invalid pattern."""
        value = {
            "type": "indicator",
            "spec_version": "2.1",
            "id": IND_ID,
            "pattern": "(" * 5000 + "[a:b = 'c']" + ")" * 5000,
            "pattern_type": "stix",
        }
        with self.assertRaises(codec.DecodeError) as caught:
            codec.decode_stix(json.dumps(value).encode("utf-8"))
        self.assertEqual(caught.exception.reason, "stix_invalid_pattern")


def indicator(**properties):
    return stix.Indicator(
        id=IND_ID,
        pattern="[domain-name:value = 'evil.example.com']",
        pattern_type="stix",
        valid_from="2022-05-16T10:00:00Z",
        properties=properties,
    )


class ModelTests(SynchronousTestCase):
    """The STIX objects check what STIX requires of them on construction."""

    def test_removes(self):
        """An Indicator removes exactly when x_threatbus_update is REMOVE."""
        self.assertTrue(indicator(x_threatbus_update="REMOVE").removes)
        self.assertFalse(indicator(x_threatbus_update="EDIT").removes)
        self.assertFalse(indicator().removes)

    def test_valid_until_after_valid_from(self):
        """valid_until must be later than valid_from: equal or earlier is refused."""
        for until in ("2022-05-16T10:00:00Z", "2022-05-16T09:59:59.999Z"):
            self.assertRaises(stix.StixError, indicator, valid_until=until)
        later = "2022-05-16T10:00:00.001Z"
        self.assertEqual(indicator(valid_until=later).properties["valid_until"], later)

    def test_invalid_pattern(self):
        """An invalid stix pattern is refused with reason invalid_pattern; other pattern types are not checked."""
        with self.assertRaises(stix.StixError) as caught:
            stix.Indicator(id=IND_ID, pattern="[garbage", pattern_type="stix")
        self.assertEqual(caught.exception.reason, "invalid_pattern")
        stix.Indicator(id=IND_ID, pattern="[garbage", pattern_type="suricata")

    def test_indicator_id_type(self):
        """An Indicator's id must be an indicator id."""
        self.assertRaises(stix.StixError, stix.Indicator, id=SIG_ID, pattern="[a:b = 'c']", pattern_type="stix")

    def test_sighting_of_sco_refused(self):
        """A Sighting of a cyber-observable (or a relationship) is refused; of an SDO it is not."""
        for ref in ("ipv4-addr--" + IND_ID[11:], "relationship--" + IND_ID[11:]):
            self.assertRaises(stix.StixError, stix.Sighting, id=SIG_ID, sighting_of_ref=ref)
        for ref in (IND_ID, "malware--" + IND_ID[11:]):
            self.assertEqual(stix.Sighting(id=SIG_ID, sighting_of_ref=ref).sighting_of_ref, ref)

    def test_last_seen_not_before_first_seen(self):
        """last_seen before first_seen is refused; the same instant is fine."""
        self.assertRaises(
            stix.StixError,
            stix.Sighting,
            id=SIG_ID,
            sighting_of_ref=IND_ID,
            last_seen="2022-05-16T09:59:59Z",
            properties={"first_seen": "2022-05-16T10:00:00Z"},
        )
        sighting = stix.Sighting(
            id=SIG_ID,
            sighting_of_ref=IND_ID,
            last_seen="2022-05-16T10:00:00Z",
            properties={"first_seen": "2022-05-16T10:00:00Z"},
        )
        self.assertEqual(sighting.last_seen, "2022-05-16T10:00:00Z")

    def test_structure_unstructure(self):
        """structure of unstructure gives the same object back."""
        obj = indicator(x_threatbus_update="REMOVE", labels=["l1"])
        self.assertEqual(stix.structure(stix.unstructure(obj)), obj)

    def test_structure_refuses_non_objects(self):
        """structure refuses what is not a JSON object, with reason malformed."""
        for value in ([], "indicator", None, 5):
            with self.assertRaises(stix.StixError) as caught:
                stix.structure(value)
            self.assertEqual(caught.exception.reason, "malformed")
