"""
STIX 2.1 patterns: validation, and the point-equality shape that both
generations of Threat Bus apps understand.

Every pattern is checked as OASIS's ``stix2-patterns`` checks it. Its parser
takes about a quarter of a millisecond a pattern, so the common shape
``[<object-path> = '<string>']`` is recognised first by a regular expression
that accepts a strict subset of what the grammar accepts (a property test
holds it to that), with the library's own hash checks; everything else goes
to the full parser.

The library (and ANTLR's runtime under it) loads at its first use, once, in
about 60 ms: a bus that serves 2020 apps only never carries it, and its
start-up and tail latency stay as they were (with the library loaded at
start-up, the 2020 p99 at 1,000 messages/s measured a third higher).
"""

from __future__ import annotations

import functools
import re
import types
from typing import Optional, Tuple

#: Characters of a pattern that the full parser takes (it needs about 5 us a
#: character, so 20 ms at most); longer ones are refused, so that no message
#: can hold the reactor for long. Point-equality patterns have no limit.
MAX_PARSED_LENGTH = 4096

# The grammar's keywords: never an identifier.
_KEYWORDS = frozenset(
    "AND OR NOT FOLLOWEDBY LIKE MATCHES ISSUPERSET ISSUBSET EXISTS LAST IN START STOP "
    "SECONDS TRUE FALSE WITHIN REPEATS TIMES".split()
)
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_OBJECT_TYPE = r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*"
#: A STIX string literal, as a regular expression.
STRING = r"'(?:[^'\\]|\\['\\])*'"
_PATH = rf"{_IDENTIFIER}(?:\.(?:{_IDENTIFIER}|'[A-Za-z0-9_-]+'))*"
_POINT = re.compile(rf"\[({_OBJECT_TYPE}):({_PATH}) = ({STRING})\]")
_IDENTIFIER_RE = re.compile(_IDENTIFIER)
_COMPONENT = re.compile(rf"{_IDENTIFIER}|'[^']*'")
_UNESCAPE = re.compile(r"\\(['\\])")


@functools.cache
def _library() -> types.SimpleNamespace:
    """What the bus uses of stix2-patterns, imported at the first call."""
    from stix2patterns.inspector import INDEX_STAR
    from stix2patterns.v21.object_validator import HASHES_REGEX
    from stix2patterns.v21.pattern import Pattern
    from stix2patterns.validator import run_validator

    return types.SimpleNamespace(
        INDEX_STAR=INDEX_STAR, HASHES_REGEX=HASHES_REGEX, Pattern=Pattern, run_validator=run_validator
    )


class PatternError(ValueError):
    """A pattern that is not valid STIX 2.1; the text says why."""


def validate(pattern: str, version: str = "2.1") -> None:
    """
    Raise ``PatternError`` unless ``pattern`` is a valid pattern of STIX
    ``version`` (2.1, or 2.0 for Indicators whose ``pattern_version`` says so).
    """
    match = _POINT.fullmatch(pattern)
    if match is not None and _plain_point(match):
        return  # the same in both versions
    if len(pattern) > MAX_PARSED_LENGTH:
        raise PatternError(
            f"a pattern of {len(pattern)} characters: more than {MAX_PARSED_LENGTH} are not parsed"
        )
    try:
        errors = _library().run_validator(pattern, version)
    except Exception as e:  # the parser's own limits (deep nesting)
        raise PatternError(f"the pattern parser gave up: {type(e).__name__}") from None
    if errors:
        raise PatternError(errors[0].removeprefix("FAIL: "))


def _plain_point(match) -> bool:
    """Whether the point-equality ``match`` is valid as the grammar has it."""
    object_type, path, literal = match.groups()
    components = _COMPONENT.findall(path)
    if any(c.upper() in _KEYWORDS for c in components) or object_type.upper() in _KEYWORDS:
        return False  # a keyword: leave the verdict to the parser
    if "hashes" in components:
        # the library's check, as it makes it (v21/object_validator.py)
        algorithm = components[-1].upper().replace("-", "").replace("'", "")
        expected = _library().HASHES_REGEX.get(algorithm)
        if expected is not None and not re.match(expected[0], literal.replace("'", "")):
            return False
    return True


def point(pattern: str) -> Optional[Tuple[str, str]]:
    """
    ``(object_path, value)`` of a valid point-equality pattern: one
    comparison ``<object-path> = '<string>'``, no operators, no qualifiers,
    in any spacing and parentheses; the path in its plainest spelling
    (``file:hashes.MD5``, ``file:hashes.'SHA-256'``) and the value
    unescaped. None for any other pattern.
    """
    match = _POINT.fullmatch(pattern)
    if match is not None:
        object_type, path, literal = match.groups()
        components = _COMPONENT.findall(path)
        return f"{object_type}:{_path(c.strip(chr(39)) for c in components)}", unquote(literal)
    if len(pattern) > MAX_PARSED_LENGTH:
        return None
    try:
        data = _library().Pattern(pattern).inspect()
    except Exception:  # not a pattern at all, or beyond the parser's limits
        return None
    if data.observation_ops or data.qualifiers or len(data.comparisons) != 1:
        return None
    ((object_type, comparisons),) = data.comparisons.items()
    if len(comparisons) != 1:
        return None
    ((components, operator, literal),) = comparisons
    if operator != "=" or not isinstance(literal, str) or not literal.startswith("'"):
        return None
    return f"{object_type}:{_path(components)}", unquote(literal)


def _path(components) -> str:
    """An object path from its components, quoting only where the grammar needs it."""
    text = ""
    for c in components:
        if isinstance(c, int):
            text += f"[{c}]"
        elif c is _library().INDEX_STAR:
            text += "[*]"
        else:
            plain = _IDENTIFIER_RE.fullmatch(c) and c.upper() not in _KEYWORDS
            text += ("." if text else "") + (c if plain else quote(c))
    return text


def unquote(literal: str) -> str:
    """The string that the STIX string literal ``literal`` stands for."""
    return _UNESCAPE.sub(r"\1", literal[1:-1])


def quote(value: str) -> str:
    """``value`` as a STIX pattern string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def point_pattern(object_path: str, value: str) -> str:
    """The point-equality pattern of ``object_path`` and ``value``."""
    return f"[{object_path} = {quote(value)}]"
