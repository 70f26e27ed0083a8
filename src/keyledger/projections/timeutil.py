"""Read models store instants as integer microseconds since the epoch (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_micros(moment: datetime) -> int:
    """An aware datetime as microseconds since the epoch."""
    return (moment - _EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=micros)


# The instants a read-model row can hold: what ``from_micros`` reads back (years 1 to 9999).
MIN_MICROS = to_micros(datetime.min.replace(tzinfo=UTC))
MAX_MICROS = to_micros(datetime.max.replace(tzinfo=UTC))


def instant_micros(moment: datetime) -> int | None:
    """``to_micros`` of a replayed event's time; None for a time no keyledger write
    carries: naive, or beyond the years 1 to 9999 once in UTC.

    A read's event reaches the projections decoded straight from its bytes
    (``decode_read``), its time checked to be a datetime only. A naive one failed a
    rebuild with a ``TypeError``; one such as 0001-01-01T00:00:00+14:00 was projected
    into a row that ``from_micros`` cannot read back, and every audit query failed,
    asking for a rebuild that projected the same row again (found by review)."""
    try:
        micros = to_micros(moment)
    except TypeError:  # naive (or no datetime at all)
        return None
    return micros if MIN_MICROS <= micros <= MAX_MICROS else None


def optional_micros(moment: datetime | None) -> int | None:
    return None if moment is None else to_micros(moment)


def optional_datetime(micros: int | None) -> datetime | None:
    return None if micros is None else from_micros(micros)
