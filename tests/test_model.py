"""
The message model: its enumerations match Threat Bus 2020.11.26's numbering,
and its validators refuse malformed messages with a message that says why.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tests.vectors import VECTORS
from txthreatbus.model import (
    BY_TOPIC,
    MESSAGE_TYPES,
    Intel,
    IntelData,
    IntelType,
    MessageType,
    Operation,
    Sighting,
    SnapshotEnvelope,
    SnapshotRequest,
    Subscription,
    Unsubscription,
)


TS = datetime(2020, 11, 26, 14, 46, 52, 123456)


def intel_data(**kw) -> IntelData:
    return IntelData(**{"indicator": ("evil.example.com",), "intel_type": IntelType.DOMAIN, **kw})


def intel(**kw) -> Intel:
    return Intel(**{"ts": TS, "id": "intel-1", "data": intel_data(), "operation": Operation.ADD, **kw})


def sighting(**kw) -> Sighting:
    return Sighting(**{"ts": TS, "intel": "intel-1", "context": {"source": "VAST"}, "ioc": ("x",), **kw})


class EnumerationTests(SynchronousTestCase):
    """The numbers on the wire are Threat Bus 2020.11.26's."""

    def test_intel_types(self):
        """IntelType has exactly the 47 names and numbers of the vectors' table."""
        table = VECTORS["intel_types"]
        self.assertEqual(len(table), 47)
        self.assertEqual({t.name: t.value for t in IntelType}, table)

    def test_intel_types_numbered_from_one(self):
        """IntelType numbers run 1 (IPSRC) to 47 (FILENAME_TLSH) without gaps."""
        self.assertEqual(sorted(t.value for t in IntelType), list(range(1, 48)))
        self.assertIs(IntelType(1), IntelType.IPSRC)
        self.assertIs(IntelType(47), IntelType.FILENAME_TLSH)

    def test_message_types(self):
        """MessageType has exactly the names and numbers of the vectors' table."""
        self.assertEqual({t.name: t.value for t in MessageType}, VECTORS["message_types"])

    def test_operations(self):
        """Operation has exactly the values of the vectors' table, each its own name."""
        self.assertEqual(sorted(o.value for o in Operation), sorted(VECTORS["operations"]))
        for o in Operation:
            self.assertEqual(o.name, o.value)

    def test_topics(self):
        """Each message class is found by its own bus topic."""
        for topic, cls in BY_TOPIC.items():
            self.assertEqual(cls.topic, topic)
        self.assertEqual(
            set(BY_TOPIC),
            {
                "threatbus/intel",
                "threatbus/sighting",
                "threatbus/snapshotrequest",
                "threatbus/snapshotenvelope",
                "stix2/indicator",
                "stix2/sighting",
            },
        )
        self.assertEqual(
            MESSAGE_TYPES,
            {
                "threatbus/intel": MessageType.INTEL,
                "threatbus/sighting": MessageType.SIGHTING,
                "stix2/indicator": MessageType.INTEL,
                "stix2/sighting": MessageType.SIGHTING,
            },
        )


class IntelTests(SynchronousTestCase):
    """Intel and IntelData accept well-formed values and refuse the rest."""

    def assertRefused(self, exc_types, fragment, make):
        e = self.assertRaises(exc_types, make)
        self.assertIn(fragment, str(e))
        return e

    def test_valid(self):
        """A well-formed Intel item keeps its fields; a list indicator becomes a tuple."""
        data = IntelData(["evil.exe", "abab"], IntelType.FILENAME_SHA256, {"source": "MISP"})
        item = intel(data=data, operation=Operation.REMOVE)
        self.assertEqual(item.data.indicator, ("evil.exe", "abab"))
        self.assertEqual(item.data.extra, {"source": "MISP"})
        self.assertIs(item.operation, Operation.REMOVE)
        self.assertEqual(item, intel(data=data, operation=Operation.REMOVE))
        self.assertNotEqual(item, intel(data=data))

    def test_empty_indicator(self):
        """An empty indicator is refused, naming the field."""
        self.assertRefused(
            ValueError, "indicator must be a non-empty list of strings, not ()", lambda: intel_data(indicator=())
        )

    def test_indicator_not_strings(self):
        """An indicator of non-strings, or a bare string, is refused."""
        for bad in ([1], ["a", None], "evil.example.com", None):
            self.assertRefused(
                (TypeError, ValueError), "indicator must be a non-empty list of strings",
                lambda: intel_data(indicator=bad),
            )

    def test_wrong_intel_type(self):
        """intel_type must be an IntelType, not a number or a name."""
        for bad in (11, "DOMAIN", None):
            self.assertRefused((TypeError, ValueError), "intel_type", lambda: intel_data(intel_type=bad))

    def test_extra_repeats_reserved_key(self):
        """Extra data may not repeat indicator or intel_type."""
        self.assertRefused(
            ValueError, "must not repeat ['intel_type']", lambda: intel_data(extra={"intel_type": 1})
        )

    def test_extra_not_dict(self):
        """Extra data must be a dict."""
        self.assertRefused((TypeError, ValueError), "extra", lambda: intel_data(extra=[1]))

    def test_bad_ts(self):
        """ts must be a datetime, not its text."""
        self.assertRefused(TypeError, "ts must be a datetime", lambda: intel(ts="2020-11-26 14:46:52"))

    def test_aware_ts(self):
        """An aware timestamp is as valid as a naive one."""
        self.assertEqual(intel(ts=TS.replace(tzinfo=timezone.utc)).ts.utcoffset(), timedelta(0))

    def test_bad_id(self):
        """id must be a string."""
        self.assertRefused((TypeError, ValueError), "id", lambda: intel(id=1))

    def test_bad_data(self):
        """data must be an IntelData, not its JSON."""
        self.assertRefused(
            (TypeError, ValueError), "data",
            lambda: intel(data={"indicator": ["a"], "intel_type": 1}),
        )

    def test_bad_operation(self):
        """operation must be an Operation, not its text."""
        self.assertRefused((TypeError, ValueError), "operation", lambda: intel(operation="ADD"))

    def test_frozen(self):
        """Messages cannot be changed once made."""
        item = intel()
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, item, "id", "other")


class SightingTests(SynchronousTestCase):
    """Sightings accept well-formed values and refuse the rest."""

    def test_valid(self):
        """A Sighting keeps its fields; ioc may be None; context defaults to {}."""
        s = Sighting(TS, "intel-1")
        self.assertEqual((s.context, s.ioc), ({}, None))
        self.assertEqual(sighting(ioc=["a", "b"]).ioc, ("a", "b"))

    def test_bad_ioc(self):
        """An ioc of non-strings is refused, naming the field."""
        e = self.assertRaises(TypeError, sighting, ioc=[1])
        self.assertIn("ioc must be a list of strings", str(e))

    def test_bad_context(self):
        """context must be a dict."""
        e = self.assertRaises((TypeError, ValueError), sighting, context=["x"])
        self.assertIn("context", str(e))

    def test_bad_intel(self):
        """intel (the Intel item's id) must be a string."""
        e = self.assertRaises((TypeError, ValueError), sighting, intel=None)
        self.assertIn("intel", str(e))

    def test_bad_ts(self):
        """ts must be a datetime."""
        e = self.assertRaises(TypeError, sighting, ts=1606402012)
        self.assertIn("ts must be a datetime", str(e))


class SnapshotTests(SynchronousTestCase):
    """SnapshotRequests and SnapshotEnvelopes refuse what cannot be on the wire."""

    def test_request_valid(self):
        """A request for a positive number of whole seconds is accepted."""
        r = SnapshotRequest(MessageType.SIGHTING, "id-1", timedelta(days=30))
        self.assertEqual(r.snapshot, timedelta(seconds=2592000))

    def test_request_negative_snapshot(self):
        """A negative snapshot is refused, naming the field."""
        e = self.assertRaises(ValueError, SnapshotRequest, MessageType.INTEL, "id", timedelta(days=-1))
        self.assertIn("snapshot must be a positive", str(e))

    def test_request_zero_snapshot(self):
        """A zero snapshot asks for nothing and is refused."""
        e = self.assertRaises(ValueError, SnapshotRequest, MessageType.INTEL, "id", timedelta(0))
        self.assertIn("snapshot must be a positive", str(e))

    def test_request_fractional_snapshot(self):
        """A snapshot that is not whole seconds (the wire's unit) is refused."""
        e = self.assertRaises(
            ValueError, SnapshotRequest, MessageType.INTEL, "id", timedelta(seconds=1.5)
        )
        self.assertIn("whole number of seconds", str(e))

    def test_request_snapshot_not_duration(self):
        """A snapshot given as a number of seconds is refused."""
        self.assertRaises(ValueError, SnapshotRequest, MessageType.INTEL, "id", 86400)

    def test_request_bad_type(self):
        """snapshot_type must be a MessageType."""
        e = self.assertRaises(
            (TypeError, ValueError), SnapshotRequest, "INTEL", "id", timedelta(days=1)
        )
        self.assertIn("snapshot_type", str(e))

    def test_envelope_valid(self):
        """An envelope carries the body its snapshot_type names."""
        e = SnapshotEnvelope(MessageType.INTEL, "id", intel())
        self.assertEqual(e.body, intel())
        self.assertEqual(SnapshotEnvelope(MessageType.SIGHTING, "id", sighting()).body, sighting())

    def test_envelope_body_mismatch(self):
        """A body that does not match snapshot_type is refused, naming both."""
        e = self.assertRaises(ValueError, SnapshotEnvelope, MessageType.INTEL, "id", sighting())
        self.assertIn("INTEL snapshot envelope must carry Intel or Indicator, not Sighting", str(e))
        e = self.assertRaises(ValueError, SnapshotEnvelope, MessageType.SIGHTING, "id", intel())
        self.assertIn("SIGHTING snapshot envelope must carry Sighting or Sighting, not Intel", str(e))

    def test_envelope_body_not_message(self):
        """A body that is not a message at all is refused."""
        e = self.assertRaises(ValueError, SnapshotEnvelope, MessageType.INTEL, "id", {"id": "x"})
        self.assertIn("must carry Intel or Indicator, not dict", str(e))


class SubscriptionTests(SynchronousTestCase):
    """Subscriptions validate their topic and snapshot."""

    def test_defaults(self):
        """A subscription asks for no snapshot unless told."""
        self.assertEqual(Subscription("threatbus").snapshot, timedelta(0))
        self.assertEqual(Unsubscription("p2p").topic, "p2p")

    def test_negative_snapshot(self):
        """A negative snapshot is refused."""
        e = self.assertRaises(ValueError, Subscription, "threatbus", timedelta(days=-1))
        self.assertIn("snapshot must be a duration >= 0", str(e))

    def test_bad_topic(self):
        """The topic must be a string."""
        self.assertRaises((TypeError, ValueError), Subscription, None)
        self.assertRaises((TypeError, ValueError), Unsubscription, 5)
