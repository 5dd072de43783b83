"""
The bridge between the two generations of Threat Bus apps: 2020 Intel and
Sightings become STIX 2.1 Indicators and Sightings, and back.

No Threat Bus release translates between them; the mapping is the one the
upstream plugins imply (each mapped its tool's types to 2020 IntelTypes,
and later to STIX patterns): see ``INTEL_PATHS``. ``Bridge.translate`` gives
a message's counterpart in the other generation, or None (counted in
``txthreatbus_untranslatable_total{direction,reason}``) where there is none.

Ids: a 2020 Intel id that is no STIX id becomes ``indicator--<uuid5>``,
derived from it (stable: every instance and every restart derives the same),
and the bridge remembers which original each derived id stands for, so that
a 2022 Sighting of such an Indicator reaches 2020 apps with the Intel's own
id.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Optional

from twisted.logger import Logger

from txthreatbus import codec, logs, patterns, stix
from txthreatbus.model import Intel, IntelData, IntelType, Operation, Sighting

log = Logger(observer=logs.publisher)

#: The namespace of the uuid5 ids derived from 2020 Intel ids.
NAMESPACE = uuid.UUID("5e1dd1a3-8f0e-4d1b-9d0a-7b6c2a1f3e10")

#: The STIX object path of each IntelType that has a point-equality pattern.
#: IPSRC and IPDST take ``ipv6-addr:value`` for an IPv6 value.
INTEL_PATHS = {
    IntelType.IPSRC: "ipv4-addr:value",
    IntelType.IPDST: "ipv4-addr:value",
    IntelType.EMAILSRC: "email-addr:value",
    IntelType.EMAILDST: "email-addr:value",
    IntelType.FILENAME: "file:name",
    IntelType.HOSTNAME: "domain-name:value",
    IntelType.DOMAIN: "domain-name:value",
    IntelType.URL: "url:value",
    IntelType.URI: "url:value",
    IntelType.USERAGENT: "software:name",
    IntelType.MD5: "file:hashes.MD5",
    IntelType.SHA1: "file:hashes.'SHA-1'",
    IntelType.SHA256: "file:hashes.'SHA-256'",
    IntelType.X509FINGERPRINTSHA1: "x509-certificate:hashes.'SHA-1'",
    IntelType.SSDEEP: "file:hashes.SSDEEP",
    IntelType.SHA512: "file:hashes.'SHA-512'",
    IntelType.TLSH: "file:hashes.TLSH",
}
_IPV6_PATH = "ipv6-addr:value"

#: The IntelType of each object path of a point-equality pattern: an address
#: of unknown direction is IPSRC, as Threat Bus 2020 took it.
INTEL_TYPES = {
    "ipv4-addr:value": IntelType.IPSRC,
    _IPV6_PATH: IntelType.IPSRC,
    "domain-name:value": IntelType.DOMAIN,
    "url:value": IntelType.URL,
    "email-addr:value": IntelType.EMAILSRC,
    "file:name": IntelType.FILENAME,
    "file:hashes.MD5": IntelType.MD5,
    "file:hashes.'SHA-1'": IntelType.SHA1,
    "file:hashes.'SHA-256'": IntelType.SHA256,
    "file:hashes.'SHA-512'": IntelType.SHA512,
    "file:hashes.SSDEEP": IntelType.SSDEEP,
    "file:hashes.TLSH": IntelType.TLSH,
    "software:name": IntelType.USERAGENT,
    "x509-certificate:hashes.'SHA-1'": IntelType.X509FINGERPRINTSHA1,
}

# MISP's compound ``domain|ip``, the one compound pattern with an IntelType,
# in any spacing and parentheses (in a valid pattern of two observations,
# any parentheses mean the same).
_DOMAIN_IP = re.compile(
    r"[\s(]*\[\s*domain-name\s*:\s*value\s*=\s*({s})\s*\][\s)]*AND"
    r"[\s(]*\[\s*ipv4-addr\s*:\s*value\s*=\s*({s})\s*\][\s)]*".format(s=patterns.STRING)
)

#: Derived ids remembered, at most (the oldest are forgotten first).
MEMORY = 100_000
#: Characters of the longest Intel id remembered: longer ones (no real
#: source makes them) would let a peer fill memory; their Sightings keep the
#: derived id, unless they embed the Indicator. At most about 50 MB in all.
MAX_REMEMBERED_ID = 256

TO_STIX = "2020_to_2022"
FROM_STIX = "2022_to_2020"


def indicator_id(intel_id: str) -> str:
    """The STIX Indicator id that stands for the 2020 Intel id ``intel_id``."""
    if stix.is_identifier(intel_id, "indicator"):
        return intel_id
    if stix.is_identifier("indicator--" + intel_id, "indicator"):
        return "indicator--" + intel_id
    return f"indicator--{uuid.uuid5(NAMESPACE, intel_id)}"


def intel_pattern(data: IntelData) -> Optional[str]:
    """The STIX pattern of an Intel's indicator, or None if it has none."""
    if data.intel_type is IntelType.DOMAIN_IP:
        if len(data.indicator) != 2:
            return None
        domain, ip = data.indicator
        return f"{patterns.point_pattern('domain-name:value', domain)} AND {patterns.point_pattern('ipv4-addr:value', ip)}"
    path = INTEL_PATHS.get(data.intel_type)
    if path is None or len(data.indicator) != 1:
        return None
    value = data.indicator[0]
    if path == "ipv4-addr:value" and _is_ipv6(value):
        path = _IPV6_PATH
    return patterns.point_pattern(path, value)


def _is_ipv6(value: str) -> bool:
    try:
        return ipaddress.ip_address(value).version == 6
    except ValueError:
        return False


def intel_data(indicator: stix.Indicator) -> tuple:
    """``(IntelData, None)`` of a STIX Indicator, or ``(None, reason)`` if it has none."""
    if indicator.pattern_type != "stix":
        return None, "pattern_type"
    found = patterns.point(indicator.pattern)
    if found is None:
        match = _DOMAIN_IP.fullmatch(indicator.pattern)
        if match is None:
            return None, "not_point_equality"
        values = [patterns.unquote(literal) for literal in match.groups()]
        return IntelData(values, IntelType.DOMAIN_IP), None
    path, value = found
    intel_type = INTEL_TYPES.get(path)
    if intel_type is None:
        return None, "object_path"
    return IntelData((value,), intel_type), None


def _utc(ts: datetime) -> datetime:
    """``ts`` in UTC; a naive ``ts`` (2020 apps write local time) is taken as UTC."""
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


class Bridge:
    """
    Translates messages between the generations and remembers the Intel ids
    it derived STIX ids from (at most ``memory`` of them).
    """

    def __init__(self, metrics, clock, memory: int = MEMORY):
        self._metrics = metrics
        self._clock = clock
        self._memory = memory
        self._origins: OrderedDict = OrderedDict()
        self._throttle = logs.Throttle(clock)
        self._untranslatable = metrics.untranslatable

    def translate(self, message):
        """``message``'s counterpart in the other generation, or None if it has none."""
        translate = _TRANSLATIONS[type(message)]
        try:
            translated, reason = translate(self, message)
        except (TypeError, ValueError) as e:  # a value the other side cannot hold
            translated, reason = None, "invalid_value"
            self._throttle(
                "invalid_value", log.debug, "Cannot translate a {kind}: {error}", kind=message.kind, error=str(e)
            )
        if translated is None:
            direction = FROM_STIX if isinstance(message, stix.StixObject) else TO_STIX
            self._untranslatable.labels(direction, reason).inc()
        return translated

    def original_id(self, indicator_id: str) -> str:
        """The 2020 Intel id that ``indicator_id`` was derived from, or ``indicator_id``."""
        return self._origins.get(indicator_id, indicator_id)

    def _remember(self, derived: str, original: str) -> None:
        if derived == original or len(original) > MAX_REMEMBERED_ID:
            return
        origins = self._origins
        if derived in origins:
            origins.move_to_end(derived)
            return
        origins[derived] = original
        if len(origins) > self._memory:
            origins.popitem(last=False)

    def _now(self) -> str:
        return stix.format_timestamp(datetime.fromtimestamp(self._clock.seconds(), timezone.utc))

    # --- 2020 -> 2022

    def _indicator(self, intel: Intel):
        pattern = intel_pattern(intel.data)
        if pattern is None:
            return None, "intel_type"
        derived = indicator_id(intel.id)
        self._remember(derived, intel.id)
        ts = stix.format_timestamp(_utc(intel.ts))
        properties = {"pattern_version": "2.1", "x_threatbus_intel_id": intel.id}
        if intel.data.extra:
            properties["x_threatbus_intel_data"] = intel.data.extra
        if intel.operation is Operation.REMOVE:
            properties["x_threatbus_update"] = "REMOVE"
        return (
            stix.Indicator(
                id=derived,
                pattern=pattern,
                pattern_type="stix",
                created=ts,
                modified=ts,
                valid_from=ts,
                properties=properties,
            ),
            None,
        )

    def _stix_sighting(self, sighting: Sighting):
        now = self._now()
        properties = {"x_threatbus_sighting_context": sighting.context}
        source = sighting.context.get("source")
        if type(source) is str:
            properties["x_threatbus_source"] = source
        if sighting.ioc:
            properties["x_threatbus_indicator_value"] = sighting.ioc[0]
        return (
            stix.Sighting(
                # the same 2020 Sighting gives the same id on every instance
                id=f"sighting--{uuid.uuid5(NAMESPACE, codec.encode(sighting).decode('utf-8'))}",
                sighting_of_ref=indicator_id(sighting.intel),
                created=now,
                modified=now,
                last_seen=stix.format_timestamp(_utc(sighting.ts)),
                properties=properties,
            ),
            None,
        )

    # --- 2022 -> 2020

    def _intel(self, indicator: stix.Indicator):
        data, reason = intel_data(indicator)
        if data is None:
            return None, reason
        ts = indicator.created or indicator.valid_from or indicator.modified
        return (
            Intel(
                ts=stix.parse_timestamp(ts) if ts else datetime.fromtimestamp(self._clock.seconds(), timezone.utc),
                id=indicator.id,
                data=data,
                operation=Operation.REMOVE if indicator.removes else Operation.ADD,
            ),
            None,
        )

    def _sighting(self, sighting: stix.Sighting):
        properties = sighting.properties
        embedded = properties.get("x_threatbus_indicator")
        intel = self.original_id(sighting.sighting_of_ref)
        if isinstance(embedded, dict) and type(embedded.get("x_threatbus_intel_id")) is str:
            intel = embedded["x_threatbus_intel_id"]
        # custom properties, of any type: what is not as expected is left out
        context = properties.get("x_threatbus_sighting_context")
        context = dict(context) if type(context) is dict else {}
        source = properties.get("x_threatbus_source")
        if type(source) is str:
            context.setdefault("source", source)
        ts = sighting.last_seen or sighting.created
        return (
            Sighting(
                ts=stix.parse_timestamp(ts) if ts else datetime.fromtimestamp(self._clock.seconds(), timezone.utc),
                intel=intel,
                context=context,
                ioc=_ioc(properties),
            ),
            None,
        )


def _ioc(properties: dict):
    """The indicator values a STIX Sighting names, or None."""
    value = properties.get("x_threatbus_indicator_value")
    if type(value) is str:
        return (value,)
    embedded = properties.get("x_threatbus_indicator")
    if isinstance(embedded, dict) and type(embedded.get("pattern")) is str:
        found = patterns.point(embedded["pattern"])
        if found is not None:
            return (found[1],)
    return None


_TRANSLATIONS = {
    Intel: Bridge._indicator,
    Sighting: Bridge._stix_sighting,
    stix.Indicator: Bridge._intel,
    stix.Sighting: Bridge._sighting,
}
