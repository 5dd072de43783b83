"""Generate ``stix-2022.5.16.json``: golden vectors for the STIX-2.1 generation
of Threat Bus (2022.5.16), recorded from the real upstream packages.

Every verdict and every string in the output comes from running upstream code:

- ``encodings``: ``threatbus.data``'s SnapshotRequestEncoder /
  SnapshotEnvelopeEncoder (as ``threatbus_zmq/plugin.py`` and the apps call
  them), and ``stix2.parse(text, allow_custom=True).serialize()`` (what the
  zmq plugin forwards for an Indicator/Sighting an app published).
- ``objects``: the zmq plugin's acceptance test for frames on ``stix2/...``:
  ``stix2.parse(text, allow_custom=True)`` succeeds and the result's type is
  exactly ``stix2.Indicator`` or ``stix2.Sighting`` (STIX 2.1 classes).
- ``patterns``: ``stix2patterns.validator.run_validator(p, "2.1")`` (the check
  stix2's Indicator runs), plus the strict point-equality reading derived
  from ``stix2patterns``' inspector; upstream's own (looser) helpers
  ``threatbus.stix2_helpers.is_point_equality_ioc`` and
  ``split_object_path_and_value`` are recorded next to it.
- ``intel_types``: the 2020 IntelType -> STIX pattern table; every pattern is
  validated with stix2-patterns and, where the MISP 2022 plugin has a mapping
  for the IntelType's MISP attribute type, compared with the output of
  ``threatbus_misp.message_mapping.attribute_to_stix2_indicator``.
- ``inverse``: STIX pattern -> 2020 Intel, derived from the same table.

Properties upstream fills by default (timestamps from the clock, a random
``id``) are recorded with a frozen clock (FROZEN_NOW) and a fixed UUID
(FROZEN_UUID): the generator patches ``stix2.base.get_timestamp`` and the
``uuid4`` that ``stix2.properties`` uses. Nothing else is patched.

Keys beyond the agreed layout (informative; tests may ignore them):
``encodings[].body_forwarded`` (what the requester receives for an envelope),
``objects[].upstream_result`` (parsed class or exception), and for accepted
objects ``forwarded`` (the string upstream publishes), ``filled`` / ``dropped``
(properties added / left out by the re-serialization);
``patterns[].validator_errors``, ``upstream_is_point_equality_ioc``,
``upstream_split`` (threatbus.stix2_helpers' looser verdict and split, which
does not unescape); ``intel_types[].misp_type_2020``, ``misp_2022_pattern``
(what ``attribute_to_stix2_indicator`` makes of that MISP type, null when it
drops it) and ``misp_2022_differs``.

How to run (Python 3.8+; PyPI must be reachable)::

    python3 -m venv /tmp/vec-venv
    /tmp/vec-venv/bin/pip install threatbus==2022.5.16 threatbus-zmq==2022.5.16 \\
        threatbus-misp==2022.5.16 stix2==3.0.1 stix2-patterns==1.3.0
    /tmp/vec-venv/bin/python tests/vectors/make_stix_vectors.py

(from any directory: it rewrites ``stix-2022.5.16.json`` next to itself and
prints the number of entries per section; two runs give identical bytes).
``threatbus-misp`` is optional: without it the MISP cross-check is skipped and
the ``misp_2022_pattern`` fields are left out. stix2-patterns 1.3.0 is what
``threatbus==2022.5.16`` pins.
"""

import json
import os
import re
import sys
import time
import types
import uuid
from datetime import timedelta

# MISP 2022 builds `created` with datetime.fromtimestamp (local time): pin UTC.
os.environ["TZ"] = "UTC"
if hasattr(time, "tzset"):
    time.tzset()

import pytz  # noqa: E402  (a stix2 dependency)
import stix2  # noqa: E402
import stix2.base  # noqa: E402
import stix2.properties  # noqa: E402
from stix2 import Indicator, Sighting, parse  # noqa: E402
from stix2.pattern_visitor import create_pattern_object  # noqa: E402
from stix2.patterns import (  # noqa: E402
    AndObservationExpression,
    ObservationExpression,
    ParentheticalExpression,
)
from stix2.utils import STIXdatetime  # noqa: E402
from stix2patterns.inspector import INDEX_STAR  # noqa: E402
from stix2patterns.v21.pattern import Pattern  # noqa: E402
from stix2patterns.validator import run_validator  # noqa: E402
from threatbus.data import (  # noqa: E402
    MessageType,
    SnapshotEnvelope,
    SnapshotEnvelopeDecoder,
    SnapshotEnvelopeEncoder,
    SnapshotRequest,
    SnapshotRequestDecoder,
    SnapshotRequestEncoder,
)
from threatbus.stix2_helpers import (  # noqa: E402
    is_point_equality_ioc,
    split_object_path_and_value,
)

try:
    from importlib.metadata import version as _dist_version
except ImportError:  # pragma: no cover
    from pkg_resources import get_distribution

    def _dist_version(name):
        return get_distribution(name).version


try:
    import logging

    from threatbus_misp.message_mapping import attribute_to_stix2_indicator

    HAVE_MISP = True
except ImportError:
    HAVE_MISP = False

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stix-2022.5.16.json")

# --- deterministic defaults ------------------------------------------------

FROZEN_NOW = "2022-05-16T12:34:56.789012Z"
# stix2 calls IDProperty.default() twice per object (once to fill a missing
# id, once to test whether the value equals the default, in which case
# serialize() would leave it out), so uuid4() hands out a sequence, restarted
# for every object: a filled id is always FROZEN_UUID.
FROZEN_UUID = "11111111-1111-4111-8111-000000000001"
_frozen_dt = STIXdatetime(2022, 5, 16, 12, 34, 56, 789012, tzinfo=pytz.UTC)
_real_get_timestamp = stix2.base.get_timestamp
_real_uuid = stix2.properties.uuid


class _UuidShim(types.ModuleType):
    """``uuid`` as seen by stix2.properties, with a deterministic uuid4()."""

    counter = 0

    def __getattr__(self, name):
        return getattr(uuid, name)

    def uuid4(self):
        _UuidShim.counter += 1
        return uuid.UUID("11111111-1111-4111-8111-%012d" % _UuidShim.counter)


_uuid_shim = _UuidShim("uuid")


def frozen(on):
    """Switch the frozen clock / uuid4 on or off."""
    _UuidShim.counter = 0
    stix2.base.get_timestamp = (lambda: _frozen_dt) if on else _real_get_timestamp
    stix2.properties.uuid = _uuid_shim if on else _real_uuid


def check_versions():
    want = {"threatbus": "2022.5.16", "threatbus-zmq": "2022.5.16", "stix2": "3.0.1"}
    for dist, ver in want.items():
        have = _dist_version(dist)
        if have != ver:
            sys.exit(f"{dist} {have} installed, need {ver}")
    if HAVE_MISP and _dist_version("threatbus-misp") != "2022.5.16":
        sys.exit("threatbus-misp must be 2022.5.16")


# --- upstream's verdicts -----------------------------------------------------


def upstream_parse(text, freeze=True):
    """What threatbus_zmq/plugin.py does with the body of a `stix2/...` frame."""
    frozen(freeze)
    try:
        obj = parse(text, allow_custom=True)
    except Exception as e:  # noqa: BLE001 (upstream catches everything too)
        return False, f"{type(e).__name__}: {e}", None
    kind = f"{type(obj).__module__}.{type(obj).__name__}"
    if type(obj) is not Indicator and type(obj) is not Sighting:
        return False, f"parsed as {kind} (dropped: not a STIX 2.1 Indicator/Sighting)", obj
    return True, f"parsed as {kind}", obj


def forward(text):
    """The exact string the zmq plugin publishes for an accepted object."""
    ok, why, obj = upstream_parse(text)
    assert ok, (text, why)
    out = obj.serialize()
    check_unfrozen(text, ok, out)
    return out


def check_unfrozen(text, ok, out):
    """Freezing must change nothing but the values of filled properties."""
    ok2, _why, obj2 = upstream_parse(text, freeze=False)
    assert ok2 == ok, text
    if ok:
        a, b = json.loads(out), json.loads(obj2.serialize())
        assert list(a) == list(b), (a, b)
        given = json.loads(text)
        for k in a:
            assert k not in given or k in ("pattern_version",) or a[k] == b[k], (k, a, b)


# --- patterns ----------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _quote(s):
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def canonical_object_path(obj_type, path):
    """`type:a.b.'c-d'[0][*]`: components quoted only where the grammar needs it."""
    out = obj_type + ":"
    first = True
    for comp in path:
        if comp is INDEX_STAR:
            out += "[*]"
        elif isinstance(comp, int):
            out += f"[{comp}]"
        else:
            out += ("" if first else ".") + (comp if _IDENT.match(comp) else _quote(comp))
        first = False
    return out


def unescape_string_literal(lit):
    assert lit.startswith("'") and lit.endswith("'"), lit
    return re.sub(r"\\(['\\])", r"\1", lit[1:-1])


def classify_pattern(p):
    """stix2-patterns' 2.1 verdict and the strict point-equality reading."""
    try:
        errors = run_validator(p, "2.1")
    except Exception as e:  # noqa: BLE001
        errors = [f"{type(e).__name__}: {e}"]
    valid = not errors
    point, path, value = False, None, None
    if valid:
        data = Pattern(p).inspect()
        comps = [(t, c) for t, cs in data.comparisons.items() for c in cs]
        if (
            not data.observation_ops
            and not data.qualifiers
            and len(comps) == 1
            and comps[0][1][1] == "="
            and isinstance(comps[0][1][2], str)
            and comps[0][1][2].startswith("'")
        ):
            obj_type, (obj_path, _op, lit) = comps[0]
            point = True
            path = canonical_object_path(obj_type, obj_path)
            value = unescape_string_literal(lit)
    split = split_object_path_and_value(p)
    return {
        "pattern": p,
        "valid": valid,
        "point_equality": point,
        "object_path": path,
        "value": value,
        "validator_errors": errors,
        "upstream_is_point_equality_ioc": is_point_equality_ioc(p),
        "upstream_split": list(split) if split else None,
    }


# --- the 2020 IntelType table (PROTOCOL-STIX section 10) --------------------

INTEL_TYPES = {
    "IPSRC": 1, "IPDST": 2, "IPSRC_PORT": 3, "IPDST_PORT": 4, "EMAILSRC": 5,
    "EMAILDST": 6, "TARGETEMAIL": 7, "EMAILATTACHMENT": 8, "FILENAME": 9,
    "HOSTNAME": 10, "DOMAIN": 11, "DOMAIN_IP": 12, "URL": 13, "URI": 14,
    "USERAGENT": 15, "MD5": 16, "MALWARESAMPLE": 17, "FILENAME_MD5": 18,
    "SHA1": 19, "FILENAME_SHA1": 20, "SHA256": 21, "FILENAME_SHA256": 22,
    "X509FINGERPRINTSHA1": 23, "PDB": 24, "AUTHENTIHASH": 25, "SSDEEP": 26,
    "IMPHASH": 27, "PEHASH": 28, "IMPFUZZY": 29, "SHA224": 30, "SHA384": 31,
    "SHA512": 32, "SHA512_224": 33, "SHA512_256": 34, "TLSH": 35, "CDHASH": 36,
    "FILENAME_AUTHENTIHASH": 37, "FILENAME_SSDEEP": 38, "FILENAME_IMPHASH": 39,
    "FILENAME_PEHASH": 40, "FILENAME_IMPFUZZY": 41, "FILENAME_SHA224": 42,
    "FILENAME_SHA384": 43, "FILENAME_SHA512": 44, "FILENAME_SHA512_224": 45,
    "FILENAME_SHA512_256": 46, "FILENAME_TLSH": 47,
}

# IntelType -> object path (point-equality types) of the table.
PATH_OF = {
    "IPSRC": "ipv4-addr:value",
    "IPDST": "ipv4-addr:value",
    "EMAILSRC": "email-addr:value",
    "EMAILDST": "email-addr:value",
    "FILENAME": "file:name",
    "HOSTNAME": "domain-name:value",
    "DOMAIN": "domain-name:value",
    "URL": "url:value",
    "URI": "url:value",
    "USERAGENT": "software:name",
    "MD5": "file:hashes.MD5",
    "SHA1": "file:hashes.'SHA-1'",
    "SHA256": "file:hashes.'SHA-256'",
    "X509FINGERPRINTSHA1": "x509-certificate:hashes.'SHA-1'",
    "SSDEEP": "file:hashes.SSDEEP",
    "SHA512": "file:hashes.'SHA-512'",
    "TLSH": "file:hashes.TLSH",
}

# The 2020 MISP attribute type of each IntelType (2020 misp_intel_type_mapping).
MISP_TYPE_2020 = {
    "IPSRC": "ip-src", "IPDST": "ip-dst", "IPSRC_PORT": "ip-src|port",
    "IPDST_PORT": "ip-dst|port", "EMAILSRC": "email-src", "EMAILDST": "email-dst",
    "TARGETEMAIL": "target-email", "EMAILATTACHMENT": "email-attachment",
    "FILENAME": "filename", "HOSTNAME": "hostname", "DOMAIN": "domain",
    "DOMAIN_IP": "domain|ip", "URL": "url", "URI": "uri", "USERAGENT": "user-agent",
    "MD5": "md5", "MALWARESAMPLE": "malware-sample", "FILENAME_MD5": "filename|md5",
    "SHA1": "sha1", "FILENAME_SHA1": "filename|sha1", "SHA256": "sha256",
    "FILENAME_SHA256": "filename|sha256",
    "X509FINGERPRINTSHA1": "x509-fingerprint-sha1", "PDB": "pdb",
    "AUTHENTIHASH": "authentihash", "SSDEEP": "ssdeep", "IMPHASH": "imphash",
    "PEHASH": "pehash", "IMPFUZZY": "impfuzzy", "SHA224": "sha224",
    "SHA384": "sha384", "SHA512": "sha512", "SHA512_224": "sha512/224",
    "SHA512_256": "sha512/256", "TLSH": "tlsh", "CDHASH": "cdhash",
    "FILENAME_AUTHENTIHASH": "filename|authentihash",
    "FILENAME_SSDEEP": "filename|ssdeep", "FILENAME_IMPHASH": "filename|imphash",
    "FILENAME_PEHASH": "filename|pehash", "FILENAME_IMPFUZZY": "filename|impfuzzy",
    "FILENAME_SHA224": "filename|sha224", "FILENAME_SHA384": "filename|sha384",
    "FILENAME_SHA512": "filename|sha512",
    "FILENAME_SHA512_224": "filename|sha512/224",
    "FILENAME_SHA512_256": "filename|sha512/256", "FILENAME_TLSH": "filename|tlsh",
}

MD5 = "d41d8cd98f00b204e9800998ecf8427e"
SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"
SHA224 = "d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f"
SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SHA384 = (
    "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da"
    "274edebfe76f65fbd51ad2f14898b95b"
)
SHA512 = (
    "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
    "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
)
SSDEEP = "3:AXGBicFlgVNhBGcL6wCrFQEv:AXGHsNhxLsr2C"
TLSH = "T1A8E0E2AB4B53E0E1A2A0C1A8C2B0D3E0F1A2B3C4D5E6F7A8B9C0D1E2F3A4B5C6D7E8F9A0"

SAMPLE_VALUE = {
    "IPSRC": ["203.0.113.1"],
    "IPDST": ["198.51.100.7"],
    "IPSRC_PORT": ["203.0.113.1", "8080"],
    "IPDST_PORT": ["198.51.100.7", "443"],
    "EMAILSRC": ["attacker@example.com"],
    "EMAILDST": ["victim@example.org"],
    "TARGETEMAIL": ["ceo@example.org"],
    "EMAILATTACHMENT": ["invoice.pdf.exe"],
    "FILENAME": ["invoice.exe"],
    "HOSTNAME": ["host.evil.example.com"],
    "DOMAIN": ["evil.example.com"],
    "DOMAIN_IP": ["evil.example.com", "203.0.113.1"],
    "URL": ["http://evil.example.com/payload?id=1"],
    "URI": ["http://evil.example.com/gate.php"],
    "USERAGENT": ["Mozilla/5.0 (EvilBot)"],
    "MD5": [MD5],
    "MALWARESAMPLE": ["evil.exe|" + MD5],
    "FILENAME_MD5": ["evil.exe", MD5],
    "SHA1": [SHA1],
    "FILENAME_SHA1": ["evil.exe", SHA1],
    "SHA256": [SHA256],
    "FILENAME_SHA256": ["evil.exe", SHA256],
    "X509FINGERPRINTSHA1": [SHA1],
    "PDB": ["C:\\build\\evil.pdb"],
    "AUTHENTIHASH": [SHA256],
    "SSDEEP": [SSDEEP],
    "IMPHASH": [MD5],
    "PEHASH": [SHA1],
    "IMPFUZZY": ["3:rGsLYCMvMvlq:q8YLMvgq"],
    "SHA224": [SHA224],
    "SHA384": [SHA384],
    "SHA512": [SHA512],
    "SHA512_224": [SHA224],
    "SHA512_256": [SHA256],
    "TLSH": [TLSH],
    "CDHASH": [SHA1],
    "FILENAME_AUTHENTIHASH": ["evil.exe", SHA256],
    "FILENAME_SSDEEP": ["evil.exe", SSDEEP],
    "FILENAME_IMPHASH": ["evil.exe", MD5],
    "FILENAME_PEHASH": ["evil.exe", SHA1],
    "FILENAME_IMPFUZZY": ["evil.exe", "3:rGsLYCMvMvlq:q8YLMvgq"],
    "FILENAME_SHA224": ["evil.exe", SHA224],
    "FILENAME_SHA384": ["evil.exe", SHA384],
    "FILENAME_SHA512": ["evil.exe", SHA512],
    "FILENAME_SHA512_224": ["evil.exe", SHA224],
    "FILENAME_SHA512_256": ["evil.exe", SHA256],
    "FILENAME_TLSH": ["evil.exe", TLSH],
}


def is_ipv6(value):
    return ":" in value


def intel_to_pattern(name, values):
    """The table of PROTOCOL-STIX section 10 (2020 Intel -> STIX 2.1 pattern)."""
    if name == "DOMAIN_IP":
        return (
            f"[domain-name:value = {_quote(values[0])}] AND "
            f"[ipv4-addr:value = {_quote(values[1])}]"
        )
    path = PATH_OF.get(name)
    if path is None:
        return None
    if name in ("IPSRC", "IPDST") and is_ipv6(values[0]):
        path = "ipv6-addr:value"
    return f"[{path} = {_quote(values[0])}]"


def misp_2022_pattern(name, values):
    """Run the MISP 2022 plugin's mapping on the 2020 MISP type of `name`."""
    misp_type = MISP_TYPE_2020[name]
    attr = {
        "to_ids": True,
        "timestamp": "1652695200",
        "uuid": "5e1f2787-fcfc-4718-a58a-00b4c0a82f06",
        "type": misp_type,
        "value": "|".join(values),
    }
    try:
        ind = attribute_to_stix2_indicator(attr, "add", logging.getLogger("misp"))
    except ValueError as e:
        return None, f"ValueError: {e}"
    if ind is None:
        return None, "None"
    return ind.pattern, None


def build_intel_types():
    rows = []
    extra = [  # (name, values, description)
        ("IPSRC", ["2001:db8::1"], "IPv6 value -> ipv6-addr"),
        ("IPDST", ["2001:db8::2"], "IPv6 value -> ipv6-addr"),
        ("DOMAIN", ["o'reilly\\evil.example.com"],
         "value with a single quote and a backslash: both escaped in the pattern"),
        ("URL", ["http://evil.example.com/it's"], "URL with a single quote"),
    ]
    cases = [(n, SAMPLE_VALUE[n], None) for n in INTEL_TYPES] + extra
    for name, values, desc in cases:
        pattern = intel_to_pattern(name, values)
        row = {"intel_type": name, "indicator": values, "pattern": pattern}
        if desc:
            row["description"] = desc
        row["misp_type_2020"] = MISP_TYPE_2020[name]
        if pattern is not None:
            errors = run_validator(pattern, "2.1")
            assert not errors, (pattern, errors)
            info = classify_pattern(pattern)
            if name != "DOMAIN_IP":
                assert info["point_equality"], pattern
                assert info["value"] == values[0], (info, values)
        if HAVE_MISP:
            mp, err = misp_2022_pattern(name, values)
            row["misp_2022_pattern"] = mp
            if mp is not None and pattern is not None and mp != pattern:
                row["misp_2022_differs"] = True
                # The one known divergence: MISP 2022 maps every ip-src/ip-dst
                # value to ipv4-addr, also IPv6 ones.
                assert name in ("IPSRC", "IPDST") and is_ipv6(values[0]), (name, mp, pattern)
            elif mp is not None and pattern is None:
                raise AssertionError((name, mp))
        rows.append(row)
    return rows


# Inverse: canonical object path -> IntelType.
INVERSE_PATH = {
    "ipv4-addr:value": "IPSRC",
    "ipv6-addr:value": "IPSRC",
    "domain-name:value": "DOMAIN",
    "url:value": "URL",
    "email-addr:value": "EMAILSRC",
    "file:name": "FILENAME",
    "file:hashes.MD5": "MD5",
    "file:hashes.'SHA-1'": "SHA1",
    "file:hashes.'SHA-256'": "SHA256",
    "file:hashes.'SHA-512'": "SHA512",
    "file:hashes.SSDEEP": "SSDEEP",
    "file:hashes.TLSH": "TLSH",
    "software:name": "USERAGENT",
    "x509-certificate:hashes.'SHA-1'": "X509FINGERPRINTSHA1",
}


def pattern_to_intel(p):
    info = classify_pattern(p)
    if not info["valid"]:
        return None, None
    if info["point_equality"]:
        name = INVERSE_PATH.get(info["object_path"])
        return (name, [info["value"]]) if name else (None, None)
    # The MISP domain|ip shape: two observations joined by AND, in this order,
    # [domain-name:value = 'A'] AND [ipv4-addr:value = 'B'] (whitespace and
    # redundant parentheses free, as for single comparisons).
    def unwrap(expr):
        while type(expr) is ParentheticalExpression:
            expr = expr.expression
        return expr

    try:
        tree = unwrap(create_pattern_object(p, version="2.1"))
    except Exception:  # noqa: BLE001
        return None, None
    if type(tree) is AndObservationExpression and len(tree.operands) == 2:
        parts = []
        for operand in map(unwrap, tree.operands):
            if type(operand) is not ObservationExpression:
                return None, None
            parts.append(classify_pattern(str(operand)))
        if (
            all(x["point_equality"] for x in parts)
            and parts[0]["object_path"] == "domain-name:value"
            and parts[1]["object_path"] == "ipv4-addr:value"
        ):
            return "DOMAIN_IP", [parts[0]["value"], parts[1]["value"]]
    return None, None


def build_inverse(intel_rows):
    pats = []
    for row in intel_rows:
        if row["pattern"] is not None:
            pats.append((row["pattern"], f"forward table row {row['intel_type']}"))
    pats += [
        ("[file:hashes.'MD5' = '%s']" % MD5, "quoted MD5 component: same object path as file:hashes.MD5"),
        ("[file:hashes.md5 = '%s']" % MD5, "lowercase hash name: not the STIX vocabulary key MD5"),
        ("[file:hashes.'SHA1' = '%s']" % SHA1, "SHA1 without hyphen: not the vocabulary key SHA-1"),
        ("[domain-name:value='evil.example.com']", "no whitespace"),
        ("[ domain-name:value  =  'evil.example.com' ]", "extra whitespace"),
        ("([domain-name:value = 'evil.example.com'])", "parenthesized observation"),
        ("[domain-name:value = 'a\\'b\\\\c']", "escaped quote and backslash: value unescaped"),
        ("[url:value = 'http://x.example/?a=b]c']", "value containing = and ]"),
        ("[domain-name:value = 'b\u00fccher.example']", "unicode value"),
        ("[ipv4-addr:value = '203.0.113.0/24']", "CIDR value: still point equality on ipv4-addr"),
        ("[ipv4-addr:value = '203.0.113.1'] AND [domain-name:value = 'evil.example.com']",
         "domain|ip parts in the wrong order"),
        ("[domain-name:value = 'evil.example.com'] AND [ipv6-addr:value = '2001:db8::1']",
         "domain + ipv6: MISP never emits this"),
        ("[domain-name:value = 'evil.example.com'] OR [ipv4-addr:value = '203.0.113.1']", "observation OR"),
        ("[domain-name:value = 'evil.example.com']  AND [ipv4-addr:value='203.0.113.1']",
         "domain|ip shape with other whitespace"),
        ("[domain-name:value = 'o\\'reilly.example'] AND [ipv4-addr:value = '203.0.113.1']",
         "domain|ip shape with an escaped quote"),
        ("[domain-name:value = 'evil.example.com'] AND [ipv4-addr:value = '203.0.113.1'] AND [ipv4-addr:value = '203.0.113.2']",
         "three observations"),
        ("([domain-name:value = 'evil.example.com'] AND [ipv4-addr:value = '203.0.113.1'])",
         "domain|ip shape in parentheses"),
        ("([domain-name:value = 'evil.example.com']) AND ([ipv4-addr:value = '203.0.113.1'])",
         "domain|ip shape, each observation in parentheses"),
        ("[domain-name:value = 'evil.example.com'] AND [ipv4-addr:value = '203.0.113.1'] WITHIN 5 SECONDS",
         "domain|ip shape with a qualifier"),
        ("[domain-name:value = 'evil.example.com'] AND [ipv4-addr:value != '203.0.113.1']",
         "domain|ip shape with != in the second part"),
        ("[domain-name:value = 'evil.example.com' AND ipv4-addr:value = '203.0.113.1']",
         "AND inside one bracket"),
        ("[domain-name:value = 'a' OR domain-name:value = 'b']", "OR inside one bracket"),
        ("[domain-name:value != 'evil.example.com']", "!="),
        ("[domain-name:value LIKE '%.example.com']", "LIKE"),
        ("[domain-name:value MATCHES '^evil']", "MATCHES"),
        ("[domain-name:value IN ('a.example', 'b.example')]", "IN"),
        ("[ipv4-addr:value ISSUBSET '203.0.113.0/24']", "ISSUBSET"),
        ("[domain-name:value = 'evil.example.com'] WITHIN 5 SECONDS", "qualifier"),
        ("[mac-addr:value = 'aa:bb:cc:dd:ee:ff']", "object path without an IntelType"),
        ("[autonomous-system:number = 64496]", "integer value (MISP AS)"),
        ("[user-account:user_id = 'root']", "object path without an IntelType"),
        ("[file:hashes.'SHA3-256' = '%s']" % SHA256, "hash without an IntelType"),
        ("[network-traffic:dst_port = 443]", "integer comparison"),
        ("[x509-certificate:hashes.'SHA-256' = '%s']" % SHA256, "x509 SHA-256: no IntelType"),
        ("[domain-name:value = 'evil.example.com'", "invalid pattern"),
        ("", "empty"),
    ]
    out = []
    for p, desc in pats:
        name, values = pattern_to_intel(p)
        out.append({"pattern": p, "description": desc, "intel_type": name, "indicator": values})
    return out


# --- encodings ---------------------------------------------------------------

IND_ID = "indicator--6911104f-c504-4086-a15b-05e28cf73435"
SIG_ID = "sighting--4a9e2a33-7bd4-4a16-8f5e-5b2c3d1a0f77"
SNAP_ID = "8dcaaba4-04de-4035-a639-7985fc3cecd8"


def j(obj):
    return json.dumps(obj)


def indicator(**kw):
    base = {
        "type": "indicator",
        "spec_version": "2.1",
        "id": IND_ID,
        "created": "2022-05-16T10:00:00.000Z",
        "modified": "2022-05-16T10:00:00.000Z",
        "pattern": "[domain-name:value = 'evil.example.com']",
        "pattern_type": "stix",
        "pattern_version": "2.1",
        "valid_from": "2022-05-16T10:00:00Z",
    }
    for k, v in kw.items():
        if v is DROP:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def sighting(**kw):
    base = {
        "type": "sighting",
        "spec_version": "2.1",
        "id": SIG_ID,
        "created": "2022-05-16T10:05:00.000Z",
        "modified": "2022-05-16T10:05:00.000Z",
        "sighting_of_ref": IND_ID,
    }
    for k, v in kw.items():
        if v is DROP:
            base.pop(k, None)
        else:
            base[k] = v
    return base


DROP = object()


def build_encodings():
    out = []
    for st, secs, desc in [
        (MessageType.INDICATOR, timedelta(days=3), "INDICATOR request, 3 days"),
        (MessageType.SIGHTING, timedelta(days=30), "SIGHTING request, 30 days"),
        (MessageType.INDICATOR, timedelta(0), "INDICATOR request, snapshot 0"),
        (MessageType.INDICATOR, timedelta(days=-1), "negative snapshot (upstream accepts -1 days)"),
        (MessageType.SIGHTING, timedelta(days=1, seconds=1.75), "fractional seconds are truncated by int()"),
    ]:
        req = SnapshotRequest(st, SNAP_ID, secs)
        s = json.dumps(req, cls=SnapshotRequestEncoder)
        back = json.loads(s, cls=SnapshotRequestDecoder)
        assert isinstance(back, SnapshotRequest) and back.snapshot_type == st
        out.append({"kind": "snapshotrequest", "description": desc, "json": s, "value": json.loads(s)})

    for body, desc, st in [
        (j(indicator()), "envelope with an Indicator body", MessageType.INDICATOR),
        (
            j(indicator(id="indicator--5e1f2787-fcfc-4718-a58a-00b4c0a82f06",
                        created="2022-05-16T10:00:00Z", pattern_version=DROP,
                        modified=DROP, valid_from=DROP,
                        pattern="[ipv4-addr:value = '203.0.113.1']")),
            "Indicator body as the MISP 2022 plugin builds it (created only; modified/valid_from filled with the clock, frozen here)",
            MessageType.INDICATOR,
        ),
        (
            j(sighting(last_seen="2022-05-16T10:04:59.5Z",
                       x_threatbus_sighting_context={"ts": "2022-05-16T10:04:59.5Z", "source": "VAST"},
                       x_threatbus_indicator_value="evil.example.com",
                       x_threatbus_match_type="RETRO")),
            "envelope with a Sighting body",
            MessageType.SIGHTING,
        ),
    ]:
        frozen(True)
        obj = parse(body, allow_custom=True)
        env = SnapshotEnvelope(st, SNAP_ID, obj)
        s = json.dumps(env, cls=SnapshotEnvelopeEncoder)
        back = json.loads(s, cls=SnapshotEnvelopeDecoder)
        assert isinstance(back, SnapshotEnvelope), back
        out.append({
            "kind": "snapshotenvelope",
            "description": desc,
            "json": s,
            "value": json.loads(s),
            # what the zmq plugin publishes to the requester for this envelope
            "body_forwarded": back.body.serialize(),
        })

    ind_cases = [
        (indicator(), "complete Indicator, pattern_version given, .000Z timestamps"),
        (indicator(pattern_version=DROP), "stix Indicator without pattern_version: upstream adds 2.1"),
        (indicator(pattern_version=DROP, valid_from=DROP),
         "without valid_from: upstream fills the clock (frozen here at %s)" % FROZEN_NOW),
        (indicator(x_threatbus_update="REMOVE"), "custom x_threatbus_update REMOVE"),
        (indicator(x_threatbus_update="EDIT", name="evil", description="d",
                   indicator_types=["malicious-activity"], labels=["l1"], confidence=80,
                   valid_until="2023-01-01T00:00:00Z"),
         "EDIT with common properties"),
        (indicator(created="2022-05-16T10:00:00.123456Z", modified="2022-05-16T10:00:00.123Z",
                   valid_from="2022-05-16T10:00:00.102430Z", x_threatbus_update="REMOVE"),
         "fraction timestamps: trailing zeros dropped"),
        (indicator(created="2022-05-16T10:00:00.1Z", modified="2022-05-16T10:00:00.100000Z"),
         "one-digit and six-digit fractions"),
        ({"x_custom": {"nested": [1, {"b": None}]}, "valid_from": "2022-05-16T10:00:00Z",
          "pattern_version": "2.1", "pattern_type": "stix",
          "pattern": "[ipv4-addr:value = '203.0.113.1']", "modified": "2022-05-16T10:00:00Z",
          "created": "2022-05-16T10:00:00Z", "id": IND_ID, "spec_version": "2.1",
          "type": "indicator", "revoked": False},
         "keys in reverse order, nested custom object, explicit revoked false"),
        (indicator(pattern_type="suricata", pattern_version=DROP,
                   pattern='alert ip 203.0.113.1 any -> any any (msg:"evil"; sid:1000001; rev:1;)'),
         "suricata rule: no pattern_version added"),
        (indicator(pattern="[domain-name:value = 'b\u00fccher.example']", name="\u00fc\u20ac\U0001f600"),
         "non-ASCII: serialize() keeps it as \\u escapes"),
    ]
    for obj, desc in ind_cases:
        s = j(obj)
        out.append({"kind": "indicator", "description": desc, "input": s, "json": forward(s)})

    sig_cases = [
        (sighting(), "minimal Sighting"),
        (sighting(last_seen="2022-05-16T10:04:59.123Z", first_seen="2022-05-16T10:04:59.123Z",
                  count=1,
                  x_threatbus_sighting_context={"ts": "2022-05-16T10:04:59.123Z", "uid": "CXWv6p3arKYeMETxOg",
                                                "id.orig_h": "203.0.113.1", "nested": {"a": [1, 2]}},
                  x_threatbus_indicator_value="evil.example.com", x_threatbus_match_type="LIVE"),
         "VAST live match style with context, value and match type"),
        (sighting(sighting_of_ref="note--00000000-0000-4000-8000-000000000000",
                  last_seen="2022-05-16T10:04:59Z",
                  x_threatbus_sighting_context={"source": "VAST"},
                  x_threatbus_indicator_value="203.0.113.1", x_threatbus_match_type="LIVE"),
         "sighting_of_ref placeholder note--00000000-0000-4000-8000-000000000000 as vast sends"),
        (sighting(created=DROP, modified=DROP, last_seen="2022-05-16T10:04:59Z",
                  x_threatbus_source="zeek"),
         "without created/modified: filled with the clock (frozen here at %s)" % FROZEN_NOW),
        (sighting(x_threatbus_indicator=indicator(x_threatbus_update="REMOVE"),
                  x_threatbus_match_type="RETRO", last_seen="2022-05-16T10:04:59Z"),
         "retro match: the whole Indicator nested in x_threatbus_indicator"),
    ]
    for obj, desc in sig_cases:
        s = j(obj)
        out.append({"kind": "sighting", "description": desc, "input": s, "json": forward(s)})
    return out


# --- objects -----------------------------------------------------------------

U1 = "indicator--c232fa2c-d50b-11ec-9d64-0242ac120002"  # UUIDv1


def build_objects():
    cases = []

    def add(desc, category, obj):
        cases.append((desc, category, obj if isinstance(obj, str) else j(obj)))

    # ok
    add("minimal stix Indicator", "ok", indicator())
    add("Indicator without pattern_version", "ok", indicator(pattern_version=DROP))
    add("Indicator with common optional properties", "ok",
        indicator(name="evil", description="d", indicator_types=["malicious-activity"],
                  labels=["a", "b"], confidence=80, valid_until="2023-01-01T00:00:00Z",
                  kill_chain_phases=[{"kill_chain_name": "lockheed-martin-cyber-kill-chain",
                                      "phase_name": "delivery"}],
                  external_references=[{"source_name": "misp", "external_id": "42"}],
                  lang="en", revoked=False))
    add("Indicator with x_threatbus_update REMOVE", "ok", indicator(x_threatbus_update="REMOVE"))
    add("Indicator with custom properties including nested objects", "ok",
        indicator(x_threatbus_update="EDIT", x_source={"org": "CIRCL", "tags": ["tlp:white"],
                                                       "deep": {"a": [1, {"b": None}]}}))
    add("suricata Indicator with a rule", "ok",
        indicator(pattern_type="suricata", pattern_version=DROP,
                  pattern='alert dns any any -> any any (msg:"evil"; dns.query; content:"evil.example.com"; sid:1000001; rev:1;)'))
    add("suricata Indicator whose pattern is not a rule (not checked)", "ok",
        indicator(pattern_type="suricata", pattern_version=DROP, pattern="this is not a rule"))
    add("yara Indicator", "ok",
        indicator(pattern_type="yara", pattern_version=DROP, pattern="rule x { condition: true }"))
    add("sigma/snort Indicator (pattern_type open vocabulary)", "ok",
        indicator(pattern_type="snort", pattern_version=DROP, pattern="alert tcp any any -> any any"))
    add("pattern_type outside the vocabulary", "ok",
        indicator(pattern_type="my-own-type", pattern_version=DROP, pattern="anything"))
    add("pattern_type 'STIX' (uppercase): not 'stix', so the pattern is not validated", "ok",
        indicator(pattern_type="STIX", pattern_version=DROP, pattern="[[[ garbage"))
    add("compound (non point-equality) stix pattern", "ok",
        indicator(pattern="[domain-name:value = 'evil.example.com'] AND [ipv4-addr:value = '203.0.113.1']"))
    add("stix pattern with qualifiers", "ok",
        indicator(pattern="[ipv4-addr:value = '203.0.113.1'] REPEATS 3 TIMES WITHIN 60 SECONDS"))
    add("Indicator with UUIDv1 id", "ok", indicator(id=U1))
    add("minimal Sighting", "ok", sighting())
    add("Sighting with Threat Bus custom properties", "ok",
        sighting(last_seen="2022-05-16T10:04:59Z", first_seen="2022-05-16T10:04:59Z", count=3,
                 x_threatbus_sighting_context={"ts": "2022-05-16T10:04:59Z", "source": "VAST"},
                 x_threatbus_indicator_value="evil.example.com", x_threatbus_match_type="LIVE",
                 x_threatbus_source="VAST"))
    add("Sighting of the vast placeholder note--00000000-0000-4000-8000-000000000000", "ok",
        sighting(sighting_of_ref="note--00000000-0000-4000-8000-000000000000"))
    add("Sighting with nested x_threatbus_indicator", "ok",
        sighting(x_threatbus_indicator=indicator(), x_threatbus_match_type="RETRO"))
    add("Sighting with where_sighted_refs", "ok",
        sighting(where_sighted_refs=["identity--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e"]))
    add("Sighting of a malware SDO (any SDO may be sighted)", "ok",
        sighting(sighting_of_ref="malware--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e"))

    # spec_version
    add("Indicator without spec_version (parsed as STIX 2.0: labels required)", "spec_version",
        indicator(spec_version=DROP))
    add("Indicator without spec_version but with labels (parses as a STIX 2.0 Indicator)", "spec_version",
        indicator(spec_version=DROP, labels=["malicious-activity"], pattern_type=DROP,
                  pattern_version=DROP))
    add("Indicator with spec_version 2.0", "spec_version",
        indicator(spec_version="2.0", labels=["malicious-activity"]))
    add("Indicator with spec_version 2.2", "spec_version", indicator(spec_version="2.2"))
    add("Indicator with spec_version as a number", "spec_version", indicator(spec_version=2.1))
    add("Sighting without spec_version (STIX 2.0 Sighting)", "spec_version", sighting(spec_version=DROP))

    # unknown types
    add("malware SDO", "unknown_type",
        {"type": "malware", "spec_version": "2.1", "id": "malware--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e",
         "created": "2022-05-16T10:00:00Z", "modified": "2022-05-16T10:00:00Z", "name": "evil",
         "is_family": False})
    add("identity SDO", "unknown_type",
        {"type": "identity", "spec_version": "2.1", "id": "identity--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e",
         "created": "2022-05-16T10:00:00Z", "modified": "2022-05-16T10:00:00Z", "name": "me"})
    add("ipv4-addr SCO", "unknown_type",
        {"type": "ipv4-addr", "spec_version": "2.1", "value": "203.0.113.1"})
    add("custom object type x-threatbus-foo", "unknown_type",
        {"type": "x-threatbus-foo", "spec_version": "2.1",
         "id": "x-threatbus-foo--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e",
         "created": "2022-05-16T10:00:00Z", "modified": "2022-05-16T10:00:00Z"})
    add("unknown type without id", "unknown_type", {"type": "foo", "spec_version": "2.1"})
    add("snapshotrequest JSON on a stix2/ topic", "unknown_type",
        {"type": "snapshotrequest", "snapshot_type": 1, "snapshot_id": SNAP_ID, "snapshot": 60})

    # bundle
    add("bundle with one Indicator", "bundle",
        {"type": "bundle", "id": "bundle--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e", "objects": [indicator()]})
    add("empty bundle", "bundle", {"type": "bundle", "id": "bundle--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e"})

    # invalid patterns
    for p, d in [
        ("[domain-name:value = 'evil.example.com'", "unbalanced bracket"),
        ("[domain-name:value = evil.example.com]", "unquoted value"),
        ("[domain-name:value = 'a'] and [domain-name:value = 'b']", "lowercase 'and'"),
        ("", "empty pattern"),
        ("evil.example.com", "bare value"),
        ("[file:hashes.MD5 = 'abc']", "MD5 value that is not 32 hex digits (hash check)"),
        ("[file:hashes.'SHA-256' = '%s']" % ("z" * 64), "SHA-256 value with non-hex digits"),
        ("[ipv4-addr:value = '203.0.113.1'] START '2022-01-01T00:00:00Z' STOP '2022-02-01T00:00:00Z'",
         "STIX 2.0 START/STOP syntax (2.1 needs t'...')"),
    ]:
        add(f"invalid stix pattern: {d}", "invalid_pattern", indicator(pattern=p))
    add("valid 2.1 START/STOP pattern but pattern_version 2.0: validated by the 2.0 grammar", "invalid_pattern",
        indicator(pattern_version="2.0",
                  pattern="[ipv4-addr:value = '203.0.113.1'] START t'2022-01-01T00:00:00Z' STOP t'2022-02-01T00:00:00Z'"))
    add("STIX 2.0 START/STOP syntax with pattern_version 2.0: accepted", "invalid_pattern",
        indicator(pattern_version="2.0",
                  pattern="[ipv4-addr:value = '203.0.113.1'] START '2022-01-01T00:00:00Z' STOP '2022-02-01T00:00:00Z'"))
    add("pattern_version 'foo': any value but '2.1' selects the 2.0 grammar", "invalid_pattern",
        indicator(pattern_version="foo"))
    add("invalid stix pattern but pattern_type suricata: not checked", "invalid_pattern",
        indicator(pattern_type="suricata", pattern_version=DROP, pattern="[domain-name:value = "))
    add("pattern is a number", "invalid_pattern", indicator(pattern=5))

    # invalid ids
    add("nil UUID id", "invalid_id", indicator(id="indicator--00000000-0000-0000-0000-000000000000"))
    add("uppercase UUID id (kept verbatim)", "invalid_id",
        indicator(id="indicator--6911104F-C504-4086-A15B-05E28CF73435"))
    add("UUID without hyphens", "invalid_id", indicator(id="indicator--6911104fc5044086a15b05e28cf73435"))
    add("UUID in braces", "invalid_id", indicator(id="indicator--{6911104f-c504-4086-a15b-05e28cf73435}"))
    add("urn:uuid: form", "invalid_id", indicator(id="indicator--urn:uuid:6911104f-c504-4086-a15b-05e28cf73435"))
    add("non-RFC 4122 variant (Microsoft, c...)", "invalid_id",
        indicator(id="indicator--6911104f-c504-4086-c15b-05e28cf73435"))
    add("NCS variant (0...)", "invalid_id", indicator(id="indicator--6911104f-c504-4086-015b-05e28cf73435"))
    add("version nibble 0 but RFC 4122 variant", "invalid_id",
        indicator(id="indicator--6911104f-c504-0086-a15b-05e28cf73435"))
    add("id of the wrong type prefix", "invalid_id",
        indicator(id="malware--6911104f-c504-4086-a15b-05e28cf73435"))
    add("id without UUID", "invalid_id", indicator(id="indicator--1"))
    add("id with a single hyphen", "invalid_id", indicator(id="indicator-6911104f-c504-4086-a15b-05e28cf73435"))
    add("Sighting with sighting_of_ref not an id", "invalid_id", sighting(sighting_of_ref="evil.example.com"))
    add("Sighting with nil-UUID sighting_of_ref", "invalid_id",
        sighting(sighting_of_ref="indicator--00000000-0000-0000-0000-000000000000"))
    add("Sighting of an SCO (ipv4-addr)", "invalid_id",
        sighting(sighting_of_ref="ipv4-addr--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e"))
    add("Sighting of a relationship (SRO)", "invalid_id",
        sighting(sighting_of_ref="relationship--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e"))
    add("Sighting of a custom x- type", "invalid_id",
        sighting(sighting_of_ref="x-foo--e5a8a7b2-4c3b-4f5d-9d0e-6f7a8b9c0d1e"))

    # malformed
    for ts, d in [
        ("2022-05-16T10:00:00", "no Z"),
        ("2022-05-16T10:00:00+01:00", "offset +01:00"),
        ("2022-05-16T10:00:00+00:00", "offset +00:00"),
        ("2022-05-16T10:00:00.1234567Z", "7 fraction digits"),
        ("2022-05-16", "date only"),
        ("2022-05-16 10:00:00Z", "space instead of T"),
        ("2022-05-16T10:00:00z", "lowercase z"),
        ("2022-05-16T10:00:60Z", "leap second 60"),
        ("2022-02-30T10:00:00Z", "February 30"),
    ]:
        add(f"created timestamp {d}", "malformed", indicator(created=ts))
    add("valid_from timestamp with offset", "malformed", indicator(valid_from="2022-05-16T10:00:00+01:00"))
    add("Sighting last_seen without Z", "malformed", sighting(last_seen="2022-05-16T10:00:00"))
    add("modified before created (not checked)", "malformed",
        indicator(created="2022-05-16T10:00:00Z", modified="2022-05-15T10:00:00Z"))
    add("valid_until before valid_from", "malformed", indicator(valid_until="2022-05-15T10:00:00Z"))
    add("valid_until equal to valid_from", "malformed", indicator(valid_until="2022-05-16T10:00:00Z"))
    add("confidence 101 (no range check)", "malformed", indicator(confidence=101))
    add("confidence -1", "malformed", indicator(confidence=-1))
    add("confidence as a string '80'", "malformed", indicator(confidence="80"))
    add("confidence 'high'", "malformed", indicator(confidence="high"))
    add("confidence 80.5", "malformed", indicator(confidence=80.5))
    add("labels a string, not a list (coerced)", "malformed", indicator(labels="evil"))
    add("labels a list of numbers", "malformed", indicator(labels=[1, 2]))
    add("labels an empty list", "malformed", indicator(labels=[]))
    add("revoked 'yes'", "malformed", indicator(revoked="yes"))
    add("Sighting count -1", "malformed", sighting(count=-1))
    add("Sighting count 1000000000", "malformed", sighting(count=1000000000))
    add("Sighting first_seen after last_seen", "malformed",
        sighting(first_seen="2022-05-16T11:00:00Z", last_seen="2022-05-16T10:00:00Z"))
    add("custom property name not starting with x_ (allowed with allow_custom)", "malformed",
        indicator(threatbus_update="REMOVE"))
    add("custom property name with invalid characters", "malformed", indicator(**{"x-bad name": 1}))
    add("custom property name too short", "malformed", indicator(xy=1))
    add("not JSON", "malformed", "this is not json")
    add("truncated JSON", "malformed", j(indicator())[:-5])
    add("JSON array", "malformed", "[1, 2]")
    add("JSON string", "malformed", '"indicator"')
    add("empty body", "malformed", "")
    add("object without type", "malformed", indicator(type=DROP))
    add("type indicator with different letter case", "malformed", indicator(type="Indicator"))

    # missing properties
    add("Indicator without pattern", "missing_property", indicator(pattern=DROP))
    add("Indicator without pattern_type", "missing_property", indicator(pattern_type=DROP))
    add("Indicator without id (filled with uuid4(), frozen here)", "missing_property", indicator(id=DROP))
    add("Indicator without created (filled with the clock)", "missing_property", indicator(created=DROP))
    add("Indicator without modified (filled with the clock)", "missing_property", indicator(modified=DROP))
    add("Indicator without created and modified", "missing_property", indicator(created=DROP, modified=DROP))
    add("Indicator without valid_from (filled with the clock)", "missing_property", indicator(valid_from=DROP))
    add("Indicator with only type, spec_version, pattern, pattern_type", "missing_property",
        {"type": "indicator", "spec_version": "2.1", "pattern": "[domain-name:value = 'evil.example.com']",
         "pattern_type": "stix"})
    add("Sighting without sighting_of_ref", "missing_property", sighting(sighting_of_ref=DROP))
    add("Sighting without created/modified (filled with the clock)", "missing_property",
        sighting(created=DROP, modified=DROP))
    add("Sighting without id (filled with uuid4(), frozen here)", "missing_property", sighting(id=DROP))

    out = []
    for desc, category, text in cases:
        ok, why, obj = upstream_parse(text)
        if not ok:
            check_unfrozen(text, ok, None)
        entry = {"description": desc, "json": text, "upstream_accepts": ok, "category": category,
                 "upstream_result": why}
        if ok:
            fwd = obj.serialize()
            check_unfrozen(text, ok, fwd)
            entry["forwarded"] = fwd
            try:
                given = set(json.loads(text))
            except Exception:  # pragma: no cover
                given = set()
            entry["filled"] = sorted(set(json.loads(fwd)) - given)
            entry["dropped"] = sorted(given - set(json.loads(fwd)))
        out.append(entry)
    return out


# --- patterns ----------------------------------------------------------------


def build_patterns():
    ps = [
        # every object path of the table
        "[ipv4-addr:value = '203.0.113.1']",
        "[ipv6-addr:value = '2001:db8::1']",
        "[domain-name:value = 'evil.example.com']",
        "[url:value = 'http://evil.example.com/payload?id=1']",
        "[email-addr:value = 'attacker@example.com']",
        "[file:name = 'invoice.exe']",
        "[file:hashes.MD5 = '%s']" % MD5,
        "[file:hashes.'SHA-1' = '%s']" % SHA1,
        "[file:hashes.'SHA-256' = '%s']" % SHA256,
        "[file:hashes.'SHA-512' = '%s']" % SHA512,
        "[file:hashes.SSDEEP = '%s']" % SSDEEP,
        "[file:hashes.TLSH = '%s']" % TLSH,
        "[software:name = 'Mozilla/5.0 (EvilBot)']",
        "[x509-certificate:hashes.'SHA-1' = '%s']" % SHA1,
        # path spellings
        "[file:hashes.'MD5' = '%s']" % MD5,
        "[file:hashes.md5 = '%s']" % MD5,
        "[file:'name' = 'invoice.exe']",
        "[x-custom-type:x_prop = 'v']",
        # escapes
        "[domain-name:value = 'o\\'reilly.example']",
        "[file:name = 'C:\\\\Windows\\\\evil.exe']",
        "[domain-name:value = 'a\\'b\\\\c']",
        "[file:name = 'ends with backslash\\\\']",
        "[domain-name:value = '']",
        "[domain-name:value = 'it's']",
        "[domain-name:value = 'bad\\escape']",
        "[url:value = 'http://x.example/?a=b]c']",
        # whitespace
        "[domain-name:value='evil.example.com']",
        "[ domain-name:value  =  'evil.example.com' ]",
        "  [domain-name:value = 'evil.example.com']  ",
        "[domain-name:value\t=\n'evil.example.com']",
        "([domain-name:value = 'evil.example.com'])",
        "[domain-name : value = 'evil.example.com']",
        # unicode
        "[domain-name:value = 'b\u00fccher.example']",
        "[software:name = '\U0001f600']",
        # non-point-equality
        "[domain-name:value = 'a.example' OR domain-name:value = 'b.example']",
        "[file:name = 'evil.exe' AND file:hashes.MD5 = '%s']" % MD5,
        "[domain-name:value = 'evil.example.com'] AND [ipv4-addr:value = '203.0.113.1']",
        "[domain-name:value = 'evil.example.com'] OR [ipv4-addr:value = '203.0.113.1']",
        "[domain-name:value = 'evil.example.com'] FOLLOWEDBY [ipv4-addr:value = '203.0.113.1']",
        "[ipv4-addr:value = '203.0.113.1'] WITHIN 5 SECONDS",
        "[ipv4-addr:value = '203.0.113.1'] REPEATS 3 TIMES",
        "[ipv4-addr:value = '203.0.113.1'] START t'2022-01-01T00:00:00Z' STOP t'2022-02-01T00:00:00Z'",
        "[ipv4-addr:value = '203.0.113.1'] START '2022-01-01T00:00:00Z' STOP '2022-02-01T00:00:00Z'",
        "[domain-name:value != 'evil.example.com']",
        "[domain-name:value NOT = 'evil.example.com']",
        "[domain-name:value LIKE '%.example.com']",
        "[domain-name:value MATCHES '^evil\\\\.']",
        "[domain-name:value IN ('a.example', 'b.example')]",
        "[ipv4-addr:value ISSUBSET '203.0.113.0/24']",
        "[file:size > 1000]",
        "[file:size <= 1000]",
        "[autonomous-system:number = 5]",
        "[file:size = 5]",
        "[x-custom:flag = true]",
        "[file:created = t'2022-05-16T10:00:00Z']",
        "[file:hashes.MD5 = h'd41d8cd98f00b204e9800998ecf8427e']",
        "[artifact:payload_bin = b'AAAA']",
        "[file:extensions.'x'.y[*] = 'a']",
        "[file:extensions.'windows-pebinary-ext'.sections[0].name = '.text']",
        "[network-traffic:src_ref.value = '203.0.113.1']",
        "[ipv4-addr:value = '203.0.113.1'] AND [ipv4-addr:value = '203.0.113.1']",
        "[domain-name:value = 'a.example' AND domain-name:value = 'a.example']",
        # invalid
        "",
        "garbage",
        "[domain-name:value = 'evil.example.com'",
        "domain-name:value = 'evil.example.com']",
        "[domain-name:value = 'evil.example.com']]",
        "[domain-name:value = evil.example.com]",
        "[domain-name:value = \"evil.example.com\"]",
        "[domain-name:value = 'a'] and [domain-name:value = 'b']",
        "[domain-name:value = 'a' and domain-name:value = 'b']",
        "[domain-name = 'evil.example.com']",
        "[Domain-Name:value = 'evil.example.com']",
        "[]",
        "[domain-name:value = 'evil.example.com'] WITHIN 5 MINUTES",
        "[file:hashes.MD5 = 'abc']",
        "[file:hashes.'SHA-256' = '%s']" % ("z" * 64),
        "[x509-certificate:hashes.'SHA-1' = 'nothex']",
        "[ipv4-addr:value = '203.0.113.1'] WITHIN 5 SECONDS WITHIN 6 SECONDS",
    ]
    return [classify_pattern(p) for p in ps]


def main():
    check_versions()
    data = {
        "source": (
            "produced by tests/vectors/make_stix_vectors.py with threatbus 2022.5.16 / "
            "threatbus-zmq 2022.5.16 / stix2 %s / stix2-patterns %s%s; defaults upstream fills "
            "from the clock or uuid4 are recorded with the clock frozen at %s and uuid4 = %s"
            % (
                _dist_version("stix2"),
                _dist_version("stix2-patterns"),
                " / threatbus-misp 2022.5.16 (cross-check)" if HAVE_MISP else " (threatbus-misp not installed: no cross-check)",
                FROZEN_NOW,
                FROZEN_UUID,
            )
        ),
        "encodings": build_encodings(),
        "objects": build_objects(),
        "patterns": build_patterns(),
    }
    data["intel_types"] = build_intel_types()
    data["inverse"] = build_inverse(data["intel_types"])
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for k, v in data.items():
        if isinstance(v, list):
            print(k, len(v))


if __name__ == "__main__":
    main()
