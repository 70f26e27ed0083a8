"""One instant per write: every event a write appends carries the same timestamp.

A write may append several events (a compromise of the active key and the rotation away
from it; a tenant's first key and its first secret). Each event used to take its own
``datetime.now()``, microseconds apart, so a point-in-time replay at an instant between
them showed half a write: a state the store never was in (a tenant with no active key).
``one_instant()`` around one attempt of a write fixes the time its events take; outside
one, an event takes the time it is created, as the library's events do.
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime

from eventsourcing.domain import datetime_now_with_tzinfo

_instant: ContextVar[datetime | None] = ContextVar("keyledger_write_instant", default=None)


def event_timestamp() -> datetime:
    """The timestamp of an event being created: the write's instant, or now."""
    return _instant.get() or datetime_now_with_tzinfo()


class OneInstant:
    """``with one_instant():`` events created inside share one timestamp (a plain class:
    a generator-based context manager costs several times as much, on every store)."""

    __slots__ = ("_token",)

    def __enter__(self) -> datetime:
        now = _instant.get() or datetime_now_with_tzinfo()  # nested: the outer write's
        self._token = _instant.set(now)
        return now

    def __exit__(self, *exc_info: object) -> None:
        _instant.reset(self._token)


def one_instant() -> OneInstant:
    """A block whose new events all take the instant it was entered."""
    return OneInstant()
