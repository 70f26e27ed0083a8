"""Input checks shared by the API and the CLI: each failure is ``InvalidInput``."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from keyledger.errors import InvalidInput

MAX_IDENTIFIER_LENGTH = 200
MAX_TEXT_LENGTH = 4096
MAX_METADATA_ENTRIES = 64
# The largest limit, offset, count or stream position accepted: it fits the signed 64-bit
# integers of SQLite and PostgreSQL (and equals the "no limit" of the queries).
MAX_COUNT = 2**62
# The widest window in days (100 years): now plus or minus it stays a representable date.
MAX_DAYS = 36_525


# Refused in every text field, found in one scan (identifiers are checked on every call):
# Unicode category Cc, which is exactly C0 and DEL plus C1, and lone surrogates. A str
# holding a lone surrogate cannot be encoded; they come from undecodable bytes
# (surrogateescape, e.g. a command-line argument) or bad input.
_CONTROL = "\x00-\x1f\x7f-\x9f\ud800-\udfff"
# Line and paragraph separators (Zl, Zp: line breaks to str.splitlines and to many
# viewers) and the bidirectional embeddings, overrides and isolates, which make text
# display in another order than it is stored ("Trojan Source", CVE-2021-42574).
_BREAKS_AND_BIDI = "\u2028-\u202e\u2066-\u2069"
# Default-ignorable code points that are not format characters: str.isprintable() takes
# them, yet they show nothing, so "ops\u034f-alice" looks like "ops-alice".
DEFAULT_IGNORABLE_SHOWN_AS_NOTHING = (
    "\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef"
)
# Every format character (Unicode category Cf, as of Unicode 14.0, Python 3.11's),
# together with the above: invisible, so two names that differ only by one look the same
# in every listing (a zero-width space, a soft hyphen, a byte-order mark).
_INVISIBLE = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
    "\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f"
    # ... and the other default-ignorable code points that show nothing (Unicode's
    # Default_Ignorable_Code_Point, less what is above): the combining grapheme joiner,
    # Hangul fillers, Khmer inherent vowels, Mongolian variation selectors, variation
    # selectors (U+FE00-FE0F, U+E0100-E01EF), the halfwidth Hangul filler.
    f"{DEFAULT_IGNORABLE_SHOWN_AS_NOTHING}"
)
# Refused in every text field, found in one scan (identifiers are checked on every call):
_REFUSED_IN_TEXT = re.compile(f"[{_CONTROL}{_BREAKS_AND_BIDI}]")
# ... and in new identifiers (tenant ids, secret names), every invisible character too.
_REFUSED_IN_IDENTIFIERS = re.compile(f"[{_CONTROL}{_INVISIBLE}]")
# What releases before 0.12 refused in identifiers and in text: only controls and lone
# surrogates. Names they stored stay addressable, and text they stored stays findable.
_REFUSED_BEFORE_0_12 = re.compile(f"[{_CONTROL}]")
# In ASCII text (str.isascii() reads a flag: no scan) only the C0 controls and DEL can
# occur of all these: one short range to test instead of some twenty.
_REFUSED_IN_ASCII = re.compile("[\x00-\x1f\x7f]")


def _check_chars(field: str, text: str, refused: re.Pattern[str] = _REFUSED_IN_TEXT) -> None:
    found = (_REFUSED_IN_ASCII if text.isascii() else refused).search(text)
    if found is None:
        return
    char = found.group()
    if "\ud800" <= char <= "\udfff":
        raise InvalidInput(f"{field} is not valid Unicode text (it holds a lone surrogate)")
    if char <= "\x9f":
        raise InvalidInput(f"{field} must not contain control characters")
    raise InvalidInput(
        f"{field} must not contain invisible, line-separating or direction-changing "
        f"characters (U+{ord(char):04X})"
    )


def _exact_str(field: str, value: object) -> str:
    """A str subclass's text as a plain str (``InvalidInput`` for anything else): results
    would otherwise carry the caller's class (an ``enum.StrEnum`` member where
    ``list()`` gives a str), and it may not exist where they are unpickled."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, not {type(value).__name__}")
    return str.__str__(value)  # (not str(value): a subclass's __str__ may say otherwise)


def check_identifier(field: str, value: object) -> str:
    """A tenant id or secret name that may already exist: non-empty, <= 200 chars, no
    control characters, no edge spaces.

    Invisible characters are refused only where a name would be new
    (``check_new_identifier``):
    releases before 0.12 accepted them, and the tenants and secrets they made must stay
    reachable (to read, delete, erase and audit them)."""
    if type(value) is not str:  # (one test on the common path, a plain str)
        value = _exact_str(field, value)
    if not value:
        raise InvalidInput(f"{field} must not be empty")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InvalidInput(f"{field} is longer than {MAX_IDENTIFIER_LENGTH} characters")
    _check_chars(field, value, _REFUSED_BEFORE_0_12)
    if value != value.strip():
        raise InvalidInput(f"{field} must not have leading or trailing whitespace")
    return value


def is_new_identifier(value: str) -> bool:
    """Whether a name that passed ``check_identifier`` may also name something new: it
    holds no invisible, line-separating or direction-changing character, and it is in
    Unicode normalization form NFC, so it looks like no other name in any listing
    ("café" with its accent composed or decomposed: the same text, two names)."""
    return value.isascii() or (
        _REFUSED_IN_IDENTIFIERS.search(value) is None and unicodedata.is_normalized("NFC", value)
    )


def check_new_identifier(field: str, value: str) -> None:
    """``InvalidInput`` for a name that ``is_new_identifier`` refuses (none in ASCII,
    where ``check_identifier`` has refused the control characters already)."""
    if value.isascii():
        return
    _check_chars(field, value, _REFUSED_IN_IDENTIFIERS)
    if not unicodedata.is_normalized("NFC", value):
        raise InvalidInput(
            f"{field} must be in Unicode normalization form NFC: written another way, "
            "the same text would look like another name (normalize it with "
            "unicodedata.normalize('NFC', ...))"
        )


def check_optional_text(
    field: str,
    value: object,
    max_length: int = MAX_TEXT_LENGTH,
    refused: re.Pattern[str] = _REFUSED_IN_TEXT,
) -> str | None:
    """Free text (category, description, user agent...): None or a bounded string."""
    if value is None:
        return None
    if type(value) is not str:
        value = _exact_str(field, value)
    if len(value) > max_length:
        raise InvalidInput(f"{field} is longer than {max_length} characters")
    _check_chars(field, value, refused)
    return value


# Text a query filters on (an actor's user id, say): what ``check_optional_text`` takes,
# and also what releases before 0.12 stored (filtering writes nothing). (A partial, not a
# wrapper: no second Python frame on the hot paths.)
check_filter_text = functools.partial(check_optional_text, refused=_REFUSED_BEFORE_0_12)

# Free text that names or identifies something (an actor's user id or address, a
# category): ``check_optional_text``, and no invisible character either, so that no two
# look alike (``ops\u200b-alice`` is not ``ops-alice``, yet shows as it).
check_label = functools.partial(check_optional_text, refused=_REFUSED_IN_IDENTIFIERS)


def check_aware(field: str, value: object) -> datetime | None:
    """None or a timezone-aware datetime, returned in UTC; naive datetimes are refused."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(f"{field} must be a datetime, not {type(value).__name__}")
    try:
        offset = value.utcoffset()
    except (ValueError, TypeError):  # a tzinfo that returns no valid offset
        raise InvalidInput(f"{field} has a time zone without a valid UTC offset") from None
    if value.tzinfo is None or offset is None:
        raise InvalidInput(f"{field} must be timezone-aware (naive datetimes are ambiguous)")
    try:
        utc = value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31 23:00-05:00 is past the last representable day
        raise InvalidInput(f"{field} is out of range once converted to UTC") from None
    if type(utc) is not datetime:  # a subclass (pandas.Timestamp, pendulum): a plain one
        utc = datetime(*utc.timetuple()[:6], utc.microsecond, tzinfo=UTC)
    return utc


def check_metadata(value: object) -> dict[str, str] | None:
    """None or a flat dict of str to str."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidInput(f"metadata must be a dict of str to str, not {type(value).__name__}")
    if len(value) > MAX_METADATA_ENTRIES:
        raise InvalidInput(f"metadata has more than {MAX_METADATA_ENTRIES} entries")
    out: dict[str, str] = {}
    for key, item in value.items():
        if type(key) is not str or type(item) is not str:
            if not isinstance(key, str) or not isinstance(item, str):
                raise InvalidInput("metadata must be a flat dict of str to str")
            key, item = str.__str__(key), str.__str__(item)  # plain str: see _exact_str
        check_optional_text("metadata key", key, MAX_IDENTIFIER_LENGTH)
        check_optional_text("metadata value", item)
        out[key] = item
    return out


def check_value(value: object, max_bytes: int) -> bytes:
    """A secret value (str or bytes) as bytes, at most ``max_bytes`` long."""
    if isinstance(value, str):
        try:
            encoded: bytes | None = value.encode("utf-8")
        except UnicodeEncodeError:  # it holds the whole value (.object): raised outside,
            encoded = None  # an error raised in here would keep it as its context
        if encoded is None:
            raise InvalidInput(
                "value is not valid Unicode text (it holds a lone surrogate); "
                "store arbitrary data as bytes"
            )
        raw = encoded
    elif isinstance(value, bytes | bytearray | memoryview):
        try:
            raw = bytes(value)
        except ValueError:  # a released memoryview: no buffer left to read
            raise InvalidInput("value is a released memoryview") from None
    else:
        raise InvalidInput(f"value must be str or bytes, not {type(value).__name__}")
    if len(raw) > max_bytes:
        raise InvalidInput(f"value is {len(raw)} bytes; the limit is {max_bytes}")
    return raw


def check_count(field: str, value: Any, *, allow_none: bool = False) -> int | None:
    """A non-negative int of at most ``MAX_COUNT`` (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{field} must be a non-negative integer")
    if value > MAX_COUNT:
        raise InvalidInput(f"{field} must be at most {MAX_COUNT}")
    return value


def check_days(field: str, value: Any) -> int:
    """A whole number of days from 0 to ``MAX_DAYS`` (100 years)."""
    days = check_count(field, value) or 0
    if days > MAX_DAYS:
        raise InvalidInput(f"{field} must be at most {MAX_DAYS} (100 years)")
    return days


def check_positions(field: str, value: object) -> frozenset[int]:
    """Stream positions: an iterable (not a str, bytes or bool) of positive ints."""
    if isinstance(value, str | bytes | bool) or not isinstance(value, Iterable):
        raise InvalidInput(f"{field} must be a collection of stream positions")
    items = list(value)
    for position in items:
        if isinstance(position, bool) or not isinstance(position, int) or position < 1:
            raise InvalidInput(f"{field} must hold positive stream positions")
        if position > MAX_COUNT:
            raise InvalidInput(f"{field} positions must be at most {MAX_COUNT}")
    return frozenset(items)


def check_bool(field: str, value: object) -> bool:
    """A real bool: 1, "yes" or None are refused rather than guessed at."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be a bool, not {type(value).__name__}")
    return value


def check_callback(field: str, value: object) -> None:
    """None or a callable (checked before any work, so a bad one cannot stop a run halfway)."""
    if value is not None and not callable(value):
        raise InvalidInput(f"{field} must be callable, not {type(value).__name__}")
