"""
The bridge between the generations: 2020 Intel and Sightings as STIX 2.1
Indicators and Sightings and back, what has no counterpart counted, and the
bus translating once, only for listeners of the other generation.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from txthreatbus import bridge as bridge_module
from txthreatbus import codec, stix
from txthreatbus.backbones.inmem import InMemoryBackbone
from txthreatbus.bridge import FROM_STIX, TO_STIX, Bridge
from txthreatbus.bus import Bus
from txthreatbus.metrics import Metrics
from txthreatbus.model import (
    Intel,
    IntelData,
    IntelType,
    MessageType,
    Operation,
    Sighting,
    SnapshotEnvelope,
)

TS = datetime(2020, 11, 26, 14, 46, 52, 123456)
UUID = "6911104f-c504-4086-a15b-05e28cf73435"
IND_ID = "indicator--" + UUID
SIG_ID = "sighting--4a9e2a33-7bd4-4a16-8f5e-5b2c3d1a0f77"
MD5 = "d41d8cd98f00b204e9800998ecf8427e"
#: The clock's time in the tests: 2022-05-16T12:34:56.789Z.
NOW = datetime(2022, 5, 16, 12, 34, 56, 789000, tzinfo=timezone.utc)


def intel(
    id="intel-1", indicator=("evil.example.com",), intel_type=IntelType.DOMAIN, ts=TS, operation=Operation.ADD, extra=None
):
    return Intel(ts, id, IntelData(indicator, intel_type, extra or {}), operation)


def stix_indicator(pattern="[domain-name:value = 'evil.example.com']", pattern_type="stix", id=IND_ID, **fields):
    return stix.Indicator(id=id, pattern=pattern, pattern_type=pattern_type, **fields)


def stix_sighting(sighting_of_ref=IND_ID, last_seen="2022-05-16T10:04:59.000Z", **properties):
    return stix.Sighting(
        id=SIG_ID,
        sighting_of_ref=sighting_of_ref,
        created="2022-05-16T10:05:00.000Z",
        modified="2022-05-16T10:05:00.000Z",
        last_seen=last_seen,
        properties=properties,
    )


class BridgeCase(SynchronousTestCase):
    """A Bridge with its own metrics and a fake clock."""

    def setUp(self):
        self.metrics = Metrics()
        self.clock = task.Clock()
        self.clock.advance(NOW.timestamp())
        self.bridge = Bridge(self.metrics, self.clock)

    def untranslatable(self, direction, reason):
        value = self.metrics.registry.get_sample_value(
            "txthreatbus_untranslatable_total", {"direction": direction, "reason": reason}
        )
        return value or 0


class IntelToIndicatorTests(BridgeCase):
    """2020 Intel becomes a STIX Indicator."""

    def test_domain(self):
        """A DOMAIN Intel becomes a stix Indicator of the domain-name pattern, pattern_version 2.1."""
        indicator = self.bridge.translate(intel())
        self.assertIsInstance(indicator, stix.Indicator)
        self.assertEqual(indicator.pattern, "[domain-name:value = 'evil.example.com']")
        self.assertEqual(indicator.pattern_type, "stix")
        self.assertEqual(indicator.properties["pattern_version"], "2.1")
        self.assertFalse(indicator.removes)
        self.assertNotIn("x_threatbus_update", indicator.properties)

    def test_indicator_id_kept(self):
        """An Intel id that already is indicator--<uuid> is the Indicator's id."""
        self.assertEqual(self.bridge.translate(intel(id=IND_ID)).id, IND_ID)

    def test_bare_uuid_prefixed(self):
        """An Intel id that is a bare UUID gets the indicator-- prefix."""
        self.assertEqual(self.bridge.translate(intel(id=UUID)).id, IND_ID)

    def test_other_ids_derived(self):
        """Any other Intel id becomes indicator--<uuid5 of it>, the same on every Bridge."""
        derived = self.bridge.translate(intel(id="intel-1")).id
        self.assertEqual(derived, f"indicator--{uuid.uuid5(bridge_module.NAMESPACE, 'intel-1')}")
        self.assertTrue(stix.is_identifier(derived, "indicator"))
        other = Bridge(Metrics(), task.Clock())
        self.assertEqual(other.translate(intel(id="intel-1")).id, derived)
        self.assertNotEqual(self.bridge.translate(intel(id="intel-2")).id, derived)

    def test_ids_of_other_types_derived(self):
        """An Intel id that is a STIX id of another type is not taken as the Indicator's id."""
        sighting_id = "sighting--" + UUID
        derived = self.bridge.translate(intel(id=sighting_id)).id
        self.assertEqual(derived, f"indicator--{uuid.uuid5(bridge_module.NAMESPACE, sighting_id)}")

    def test_intel_id_kept_as_property(self):
        """x_threatbus_intel_id is the Intel's own id."""
        for intel_id in ("intel-1", UUID, IND_ID):
            self.assertEqual(self.bridge.translate(intel(id=intel_id)).properties["x_threatbus_intel_id"], intel_id)

    def test_naive_ts_is_utc(self):
        """created, modified and valid_from are the Intel's naive ts taken as UTC, to the millisecond."""
        indicator = self.bridge.translate(intel(ts=TS))
        expected = "2020-11-26T14:46:52.123Z"
        self.assertEqual((indicator.created, indicator.modified, indicator.valid_from), (expected,) * 3)

    def test_aware_ts_converted(self):
        """An aware ts is converted to UTC."""
        ts = datetime(2020, 11, 26, 16, 46, 52, tzinfo=timezone(timedelta(hours=2)))
        indicator = self.bridge.translate(intel(ts=ts))
        expected = "2020-11-26T14:46:52.000Z"
        self.assertEqual((indicator.created, indicator.modified, indicator.valid_from), (expected,) * 3)

    def test_early_years_padded(self):
        """A ts before the year 1000 (which 2020 apps may send) gives four-digit STIX years, for Intel and Sightings."""
        ts = datetime(999, 1, 2, 3, 4, 5)
        indicator = self.bridge.translate(intel(ts=ts))
        self.assertIsNotNone(indicator)
        self.assertEqual(indicator.created, "0999-01-02T03:04:05.000Z")
        sighting = self.bridge.translate(Sighting(ts, "intel-1", {}, None))
        self.assertIsNotNone(sighting)
        self.assertEqual(sighting.last_seen, "0999-01-02T03:04:05.000Z")
        self.assertEqual(self.untranslatable(TO_STIX, "invalid_value"), 0)

    def test_remove(self):
        """A REMOVE Intel becomes an Indicator with x_threatbus_update REMOVE."""
        indicator = self.bridge.translate(intel(operation=Operation.REMOVE))
        self.assertEqual(indicator.properties["x_threatbus_update"], "REMOVE")
        self.assertTrue(indicator.removes)

    def test_extra_data(self):
        """Extra Intel data travels in x_threatbus_intel_data; without any there is none."""
        extra = {"source": "MISP", "tags": ["a", "b"]}
        self.assertEqual(self.bridge.translate(intel(extra=extra)).properties["x_threatbus_intel_data"], extra)
        self.assertNotIn("x_threatbus_intel_data", self.bridge.translate(intel()).properties)

    def test_ipv6(self):
        """An IPSRC (or IPDST) Intel of an IPv6 address becomes an ipv6-addr pattern; IPv4 stays ipv4-addr."""
        for intel_type in (IntelType.IPSRC, IntelType.IPDST):
            self.assertEqual(
                self.bridge.translate(intel(indicator=("2001:db8::1",), intel_type=intel_type)).pattern,
                "[ipv6-addr:value = '2001:db8::1']",
            )
            self.assertEqual(
                self.bridge.translate(intel(indicator=("203.0.113.1",), intel_type=intel_type)).pattern,
                "[ipv4-addr:value = '203.0.113.1']",
            )

    def test_domain_ip(self):
        """A DOMAIN_IP Intel becomes the two-observation domain AND ip pattern."""
        indicator = self.bridge.translate(
            intel(indicator=("evil.example.com", "203.0.113.1"), intel_type=IntelType.DOMAIN_IP)
        )
        self.assertEqual(
            indicator.pattern, "[domain-name:value = 'evil.example.com'] AND [ipv4-addr:value = '203.0.113.1']"
        )

    def test_quotes_escaped(self):
        """A value with quotes and backslashes is escaped in the pattern, and still valid."""
        indicator = self.bridge.translate(intel(indicator=("o'reilly\\x.example",)))
        self.assertEqual(indicator.pattern, "[domain-name:value = 'o\\'reilly\\\\x.example']")

    def test_intel_type_without_pattern(self):
        """An IntelType with no pattern gives None, counted as untranslatable 2020_to_2022 intel_type."""
        self.assertIsNone(self.bridge.translate(intel(indicator=("C:\\evil.pdb",), intel_type=IntelType.PDB)))
        self.assertEqual(self.untranslatable(TO_STIX, "intel_type"), 1)
        self.assertEqual(self.untranslatable(TO_STIX, "invalid_value"), 0)

    def test_invalid_hash(self):
        """An MD5 Intel whose value is no MD5 gives None, counted as invalid_value."""
        self.assertIsNone(self.bridge.translate(intel(indicator=("not-an-md5",), intel_type=IntelType.MD5)))
        self.assertEqual(self.untranslatable(TO_STIX, "invalid_value"), 1)
        self.assertEqual(self.untranslatable(TO_STIX, "intel_type"), 0)

    def test_valid_hash(self):
        """An MD5 Intel of a real MD5 becomes the file:hashes.MD5 pattern, nothing counted."""
        self.assertEqual(
            self.bridge.translate(intel(indicator=(MD5,), intel_type=IntelType.MD5)).pattern,
            f"[file:hashes.MD5 = '{MD5}']",
        )
        self.assertEqual(self.untranslatable(TO_STIX, "invalid_value"), 0)

    def test_encodes_as_stix(self):
        """The Indicator encodes to a STIX object that decodes back to it."""
        indicator = self.bridge.translate(intel(operation=Operation.REMOVE, extra={"k": "v"}))
        self.assertEqual(codec.decode_stix(codec.encode(indicator)), indicator)


class SightingToStixTests(BridgeCase):
    """A 2020 Sighting becomes a STIX Sighting."""

    SIGHTING = Sighting(TS, "intel-1", {"source": "VAST", "uid": "C1"}, ("evil.example.com",))

    def test_sighting_of_derived_indicator(self):
        """sighting_of_ref is the id the Intel's Indicator gets."""
        sighting = self.bridge.translate(self.SIGHTING)
        self.assertIsInstance(sighting, stix.Sighting)
        self.assertEqual(sighting.sighting_of_ref, self.bridge.translate(intel(id="intel-1")).id)
        self.assertEqual(
            self.bridge.translate(Sighting(TS, UUID, {}, None)).sighting_of_ref, IND_ID
        )

    def test_timestamps(self):
        """last_seen is the Sighting's ts (as UTC); created and modified are the clock's now."""
        sighting = self.bridge.translate(self.SIGHTING)
        self.assertEqual(sighting.last_seen, "2020-11-26T14:46:52.123Z")
        self.assertEqual((sighting.created, sighting.modified), ("2022-05-16T12:34:56.789Z",) * 2)

    def test_context_source_and_value(self):
        """The context travels whole, its source also as x_threatbus_source, ioc[0] as x_threatbus_indicator_value."""
        properties = self.bridge.translate(self.SIGHTING).properties
        self.assertEqual(properties["x_threatbus_sighting_context"], {"source": "VAST", "uid": "C1"})
        self.assertEqual(properties["x_threatbus_source"], "VAST")
        self.assertEqual(properties["x_threatbus_indicator_value"], "evil.example.com")

    def test_without_source_or_ioc(self):
        """Without a source or an ioc there is neither property."""
        properties = self.bridge.translate(Sighting(TS, "intel-1", {"uid": "C1"}, None)).properties
        self.assertNotIn("x_threatbus_source", properties)
        self.assertNotIn("x_threatbus_indicator_value", properties)

    def test_stable_id(self):
        """The same Sighting gives the same id twice, on any Bridge; another Sighting another id."""
        first = self.bridge.translate(self.SIGHTING).id
        self.assertTrue(stix.is_identifier(first, "sighting"))
        self.assertEqual(self.bridge.translate(self.SIGHTING).id, first)
        self.assertEqual(Bridge(Metrics(), task.Clock()).translate(self.SIGHTING).id, first)
        other = Sighting(TS, "intel-1", {"source": "VAST", "uid": "C2"}, ("evil.example.com",))
        self.assertNotEqual(self.bridge.translate(other).id, first)


class IndicatorToIntelTests(BridgeCase):
    """A STIX Indicator becomes 2020 Intel where its pattern has an IntelType."""

    def test_point_equality_types(self):
        """Each point-equality object path gives its IntelType and the unescaped value."""
        cases = [
            ("[ipv4-addr:value = '203.0.113.1']", IntelType.IPSRC, "203.0.113.1"),
            ("[ipv6-addr:value = '2001:db8::1']", IntelType.IPSRC, "2001:db8::1"),
            ("[domain-name:value = 'evil.example.com']", IntelType.DOMAIN, "evil.example.com"),
            ("[url:value = 'http://evil.example.com/it\\'s']", IntelType.URL, "http://evil.example.com/it's"),
            ("[email-addr:value = 'a@example.com']", IntelType.EMAILSRC, "a@example.com"),
            ("[file:name = 'evil.exe']", IntelType.FILENAME, "evil.exe"),
            (f"[file:hashes.MD5 = '{MD5}']", IntelType.MD5, MD5),
            (f"[file:hashes.'MD5' = '{MD5}']", IntelType.MD5, MD5),
            ("[software:name = 'EvilBot']", IntelType.USERAGENT, "EvilBot"),
        ]
        for pattern, intel_type, value in cases:
            result = self.bridge.translate(stix_indicator(pattern))
            self.assertIsInstance(result, Intel, pattern)
            self.assertEqual((result.data.intel_type, result.data.indicator), (intel_type, (value,)), pattern)
            self.assertEqual(result.operation, Operation.ADD)
            self.assertEqual(result.id, IND_ID)

    def test_domain_ip(self):
        """The domain AND ip compound gives one DOMAIN_IP Intel of both values."""
        result = self.bridge.translate(
            stix_indicator("[domain-name:value = 'evil.example.com'] AND [ipv4-addr:value = '203.0.113.1']")
        )
        self.assertEqual(
            (result.data.intel_type, result.data.indicator), (IntelType.DOMAIN_IP, ("evil.example.com", "203.0.113.1"))
        )

    def test_suricata(self):
        """A suricata rule has no Intel: None, counted with reason pattern_type."""
        self.assertIsNone(self.bridge.translate(stix_indicator("alert ip any any -> any any (sid:1;)", "suricata")))
        self.assertEqual(self.untranslatable(FROM_STIX, "pattern_type"), 1)

    def test_or(self):
        """An OR of comparisons has no Intel: None, counted with reason not_point_equality."""
        self.assertIsNone(
            self.bridge.translate(
                stix_indicator("[domain-name:value = 'a.example' OR domain-name:value = 'b.example']")
            )
        )
        self.assertEqual(self.untranslatable(FROM_STIX, "not_point_equality"), 1)

    def test_object_path_without_intel_type(self):
        """A mac-addr point equality has no IntelType: None, counted with reason object_path."""
        self.assertIsNone(self.bridge.translate(stix_indicator("[mac-addr:value = 'aa:bb:cc:dd:ee:ff']")))
        self.assertEqual(self.untranslatable(FROM_STIX, "object_path"), 1)
        self.assertEqual(self.untranslatable(TO_STIX, "object_path"), 0)

    def test_ts_from_created(self):
        """The Intel's ts is the Indicator's created (in UTC), else its valid_from."""
        result = self.bridge.translate(
            stix_indicator(
                created="2022-05-16T10:00:00.250Z", modified="2022-05-17T00:00:00Z", valid_from="2022-05-18T00:00:00Z"
            )
        )
        self.assertEqual(result.ts, datetime(2022, 5, 16, 10, 0, 0, 250000, tzinfo=timezone.utc))
        result = self.bridge.translate(stix_indicator(valid_from="2022-05-18T00:00:00Z"))
        self.assertEqual(result.ts, datetime(2022, 5, 18, tzinfo=timezone.utc))

    def test_remove(self):
        """x_threatbus_update REMOVE gives a REMOVE Intel."""
        result = self.bridge.translate(stix_indicator(properties={"x_threatbus_update": "REMOVE"}))
        self.assertEqual(result.operation, Operation.REMOVE)

    def test_intel_encodes_as_2020(self):
        """The Intel encodes as a 2020 Intel that decodes back to an equal one."""
        result = self.bridge.translate(stix_indicator(created="2022-05-16T10:00:00.000Z"))
        self.assertEqual(codec.decode("threatbus/intel", codec.encode(result)), result)


class StixSightingToSightingTests(BridgeCase):
    """A STIX Sighting becomes a 2020 Sighting, of the Intel the Indicator came from where that is known."""

    def test_of_derived_indicator(self):
        """A Sighting of an Indicator derived from Intel intel-1 is a Sighting of intel-1."""
        derived = self.bridge.translate(intel(id="intel-1")).id
        result = self.bridge.translate(stix_sighting(derived))
        self.assertIsInstance(result, Sighting)
        self.assertEqual(result.intel, "intel-1")

    def test_of_bare_uuid_intel(self):
        """A Sighting of the Indicator of an Intel with a bare UUID id is a Sighting of that UUID."""
        self.bridge.translate(intel(id=UUID))
        self.assertEqual(self.bridge.translate(stix_sighting(IND_ID)).intel, UUID)

    def test_embedded_intel_id(self):
        """An embedded x_threatbus_indicator's x_threatbus_intel_id names the Intel, even on a fresh Bridge."""
        derived = Bridge(Metrics(), task.Clock()).translate(intel(id="intel-1"))
        embedded = stix.unstructure(derived)
        result = self.bridge.translate(stix_sighting(derived.id, x_threatbus_indicator=embedded))
        self.assertEqual(result.intel, "intel-1")

    def test_unknown_ref_stays(self):
        """A Sighting of an Indicator the bridge did not derive keeps sighting_of_ref as the Intel id."""
        self.assertEqual(self.bridge.translate(stix_sighting(IND_ID)).intel, IND_ID)

    def test_context_and_source(self):
        """x_threatbus_sighting_context is the context; x_threatbus_source fills its source if it has none."""
        result = self.bridge.translate(
            stix_sighting(x_threatbus_sighting_context={"uid": "C1"}, x_threatbus_source="zeek")
        )
        self.assertEqual(result.context, {"uid": "C1", "source": "zeek"})
        result = self.bridge.translate(stix_sighting(x_threatbus_source="zeek"))
        self.assertEqual(result.context, {"source": "zeek"})
        result = self.bridge.translate(stix_sighting())
        self.assertEqual(result.context, {})

    def test_ts(self):
        """The Sighting's ts is last_seen, else created."""
        self.assertEqual(
            self.bridge.translate(stix_sighting()).ts, datetime(2022, 5, 16, 10, 4, 59, tzinfo=timezone.utc)
        )
        self.assertEqual(
            self.bridge.translate(stix_sighting(last_seen=None)).ts, datetime(2022, 5, 16, 10, 5, tzinfo=timezone.utc)
        )

    def test_ioc_from_value(self):
        """ioc is x_threatbus_indicator_value."""
        result = self.bridge.translate(stix_sighting(x_threatbus_indicator_value="evil.example.com"))
        self.assertEqual(result.ioc, ("evil.example.com",))

    def test_ioc_from_embedded_pattern(self):
        """Without a value, ioc is the value of the embedded Indicator's point-equality pattern; else None."""
        embedded = stix.unstructure(stix_indicator("[domain-name:value = 'o\\'r.example']"))
        result = self.bridge.translate(stix_sighting(x_threatbus_indicator=embedded))
        self.assertEqual(result.ioc, ("o'r.example",))
        self.assertIsNone(self.bridge.translate(stix_sighting()).ioc)

    def test_odd_custom_properties_left_out(self):
        """Threat Bus properties of unexpected types are left out, not a reason to drop the Sighting."""
        result = self.bridge.translate(
            stix_sighting(x_threatbus_sighting_context=None, x_threatbus_source=5, x_threatbus_indicator_value=["x"])
        )
        self.assertEqual((result.context, result.ioc), ({}, None))

    def test_memory_bounded(self):
        """With memory=2 the oldest derived id is forgotten, the later ones still map back."""
        small = Bridge(self.metrics, self.clock, memory=2)
        ids = [small.translate(intel(id=f"intel-{n}")).id for n in (1, 2, 3)]
        back = [small.translate(stix_sighting(i)).intel for i in ids]
        self.assertEqual(back, [ids[0], "intel-2", "intel-3"])

    def test_long_ids_not_remembered(self):
        """An Intel id over MAX_REMEMBERED_ID characters is not remembered: its Sighting keeps the derived id."""
        from txthreatbus.bridge import MAX_REMEMBERED_ID

        for length, remembered in ((MAX_REMEMBERED_ID, True), (MAX_REMEMBERED_ID + 1, False)):
            original = "i" * length
            derived = self.bridge.translate(intel(id=original)).id
            self.assertEqual(self.bridge.translate(stix_sighting(derived)).intel, original if remembered else derived)

    def test_memory_refreshed(self):
        """Deriving an id again makes it the newest: the one not seen since is forgotten instead."""
        small = Bridge(self.metrics, self.clock, memory=2)
        one, two = (small.translate(intel(id=f"intel-{n}")).id for n in (1, 2))
        small.translate(intel(id="intel-1"))
        three = small.translate(intel(id="intel-3")).id
        back = [small.translate(stix_sighting(i)).intel for i in (one, two, three)]
        self.assertEqual(back, ["intel-1", two, "intel-3"])

    def test_encodes_as_2020(self):
        """The Sighting encodes as a 2020 Sighting that decodes back to an equal one."""
        result = self.bridge.translate(
            stix_sighting(x_threatbus_sighting_context={"uid": "C1"}, x_threatbus_indicator_value="evil.example.com")
        )
        self.assertEqual(codec.decode("threatbus/sighting", codec.encode(result)), result)


# --- the bus


class Recorder:
    """A consumer that records what it is given."""

    def __init__(self):
        self.got = []

    def __call__(self, message):
        self.got.append(message)


INTEL = intel()
INDICATOR = stix_indicator(created="2022-05-16T10:00:00.000Z")


class BusBridgeTests(SynchronousTestCase):
    """The bus hands each consumer its own generation, translating once and only when needed."""

    def setUp(self):
        self.clock = task.Clock()
        self.bus = Bus(InMemoryBackbone(), self.clock)
        self.bus.backbone.attach(self.bus.deliver)
        self.translated = []
        translate = self.bus.bridge.translate

        def counting(message):
            self.translated.append(message)
            return translate(message)

        self.patch(self.bus.bridge, "translate", counting)

    def untranslatable(self, direction, reason):
        value = self.bus.metrics.registry.get_sample_value(
            "txthreatbus_untranslatable_total", {"direction": direction, "reason": reason}
        )
        return value or 0

    def test_intel_to_both_generations(self):
        """A 2020 Intel reaches a threatbus/intel consumer as itself and a stix2/indicator consumer as an Indicator."""
        old, new = Recorder(), Recorder()
        self.bus.subscribe("threatbus/intel", old)
        self.bus.subscribe("stix2/indicator", new)
        self.bus.publish(INTEL)
        self.assertEqual(len(old.got), 1)
        self.assertIs(old.got[0], INTEL)
        (indicator,) = new.got
        self.assertIsInstance(indicator, stix.Indicator)
        self.assertEqual(indicator.properties["x_threatbus_intel_id"], "intel-1")

    def test_stix_root_consumer(self):
        """A consumer of stix2 gets the Indicator of a 2020 Intel too."""
        root = Recorder()
        self.bus.subscribe("stix2", root)
        self.bus.publish(INTEL)
        self.assertEqual([type(m) for m in root.got], [stix.Indicator])

    def test_no_translation_without_listener(self):
        """With no consumer of the other generation, the bridge is not called."""
        old = Recorder()
        self.bus.subscribe("threatbus", old)
        self.bus.subscribe("stix2/sighting", Recorder())  # of the other generation, but not of Indicators
        self.bus.publish(INTEL)
        self.bus.publish(intel(indicator=("C:\\evil.pdb",), intel_type=IntelType.PDB))
        self.assertEqual(len(old.got), 2)
        self.assertEqual(self.translated, [])
        self.assertEqual(self.untranslatable(TO_STIX, "intel_type"), 0)

    def test_no_translation_after_unsubscribe(self):
        """Once the last consumer of the other generation is gone, the bridge is not called."""
        new = Recorder()
        self.bus.subscribe("stix2/indicator", new)
        self.bus.unsubscribe("stix2/indicator", new)
        self.bus.publish(INTEL)
        self.assertEqual(self.translated, [])

    def test_translated_once(self):
        """With five STIX consumers the Intel is translated once, and all five get the same object."""
        consumers = [Recorder() for _ in range(5)]
        for n, consumer in enumerate(consumers):
            self.bus.subscribe("stix2" if n == 0 else "stix2/indicator", consumer)
        self.bus.publish(INTEL)
        self.assertEqual(self.translated, [INTEL])
        (first,) = consumers[0].got
        for consumer in consumers[1:]:
            (got,) = consumer.got
            self.assertIs(got, first)

    def test_never_translated_back(self):
        """A translation reaches only the other generation: each consumer gets each message once."""
        old, new = Recorder(), Recorder()
        self.bus.subscribe("threatbus", old)
        self.bus.subscribe("stix2", new)
        self.bus.publish(INTEL)
        self.bus.publish(INDICATOR)
        self.assertEqual([type(m) for m in old.got], [Intel, Intel])
        self.assertIs(old.got[0], INTEL)
        self.assertEqual([type(m) for m in new.got], [stix.Indicator, stix.Indicator])
        self.assertIs(new.got[1], INDICATOR)
        self.assertEqual(self.translated, [INTEL, INDICATOR])

    def test_stix_indicator_to_2020(self):
        """A STIX Indicator reaches a threatbus/intel consumer as Intel, and the stix2 consumer as itself."""
        old, new = Recorder(), Recorder()
        self.bus.subscribe("threatbus/intel", old)
        self.bus.subscribe("stix2/indicator", new)
        self.bus.publish(INDICATOR)
        self.assertEqual(new.got, [INDICATOR])
        (result,) = old.got
        self.assertEqual((result.id, result.data.indicator), (IND_ID, ("evil.example.com",)))

    def test_stix_sighting_of_bridged_intel(self):
        """A STIX Sighting of the Indicator of a 2020 Intel reaches 2020 consumers as a Sighting of that Intel."""
        old, new = Recorder(), Recorder()
        self.bus.subscribe("threatbus/sighting", old)
        self.bus.subscribe("stix2/indicator", new)
        self.bus.publish(INTEL)
        (indicator,) = new.got
        self.bus.publish(stix_sighting(indicator.id))
        (sighting,) = old.got
        self.assertEqual(sighting.intel, "intel-1")

    def test_untranslatable_not_handed(self):
        """An Intel without a pattern reaches 2020 consumers only, and is counted."""
        old, new = Recorder(), Recorder()
        self.bus.subscribe("threatbus/intel", old)
        self.bus.subscribe("stix2/indicator", new)
        self.bus.publish(intel(indicator=("C:\\evil.pdb",), intel_type=IntelType.PDB))
        self.assertEqual(len(old.got), 1)
        self.assertEqual(new.got, [])
        self.assertEqual(self.untranslatable(TO_STIX, "intel_type"), 1)

    def test_snapshot_for_stix_requester(self):
        """A STIX requester gets a 2020 envelope body as an Indicator, and a STIX one as it is."""
        requester = Recorder()
        snapshot_id, finished = self.bus.request_snapshot("stix2/indicator", timedelta(days=1), requester)
        self.bus.publish(SnapshotEnvelope(MessageType.INTEL, snapshot_id, INTEL))
        self.bus.publish(SnapshotEnvelope(MessageType.INTEL, snapshot_id, INDICATOR))
        translated, same = requester.got
        self.assertIsInstance(translated, stix.Indicator)
        self.assertEqual(translated.properties["x_threatbus_intel_id"], "intel-1")
        self.assertIs(same, INDICATOR)
        self.assertEqual(self.translated, [INTEL])
        self.bus.finish_snapshot(snapshot_id)
        self.assertEqual(self.successResultOf(finished), 2)

    def test_snapshot_untranslatable_dropped(self):
        """An envelope body with no STIX counterpart is not handed to a STIX requester, and is counted."""
        requester = Recorder()
        snapshot_id, finished = self.bus.request_snapshot("stix2/indicator", timedelta(days=1), requester)
        pdb = intel(indicator=("C:\\evil.pdb",), intel_type=IntelType.PDB)
        self.bus.publish(SnapshotEnvelope(MessageType.INTEL, snapshot_id, pdb))
        self.assertEqual(requester.got, [])
        self.assertEqual(self.untranslatable(TO_STIX, "intel_type"), 1)
        self.bus.finish_snapshot(snapshot_id)
        self.assertEqual(self.successResultOf(finished), 0)

    def test_snapshot_for_2020_requester(self):
        """A 2020 requester gets a STIX envelope body as Intel, and a 2020 one untouched."""
        requester = Recorder()
        snapshot_id, _ = self.bus.request_snapshot("threatbus/intel", timedelta(days=1), requester)
        self.bus.publish(SnapshotEnvelope(MessageType.INTEL, snapshot_id, INDICATOR))
        self.bus.publish(SnapshotEnvelope(MessageType.INTEL, snapshot_id, INTEL))
        translated, same = requester.got
        self.assertIsInstance(translated, Intel)
        self.assertIs(same, INTEL)
        self.assertEqual(self.translated, [INDICATOR])
