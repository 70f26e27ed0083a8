"""One instant per write: every event a write appends carries the same timestamp.

A write may append several events (a compromise of the active key and the rotation away
from it; a tenant's first key and its first secret). Each event used to take its own
``datetime.now()``, microseconds apart, so a point-in-time replay at an instant between
them showed half a write: a state the store never was in (a tenant with no active key).
``one_instant()`` around one attempt of a write fixes the time its events take; outside
one, an event takes the time it is created, as the library's events do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

from eventsourcing.domain import datetime_now_with_tzinfo

# The instant of the write under way: a one-item list, empty until its first event takes
# the time (so a write that loads fresh state first is timed after what it loaded).
_instant: ContextVar[list[datetime] | None] = ContextVar("keyledger_write_instant", default=None)


def event_timestamp() -> datetime:
    """The timestamp of an event being created: the write's instant, or now."""
    held = _instant.get()
    if held is None:
        return datetime_now_with_tzinfo()
    if not held:
        held.append(datetime_now_with_tzinfo())
    return held[0]


@contextmanager
def one_instant() -> Iterator[None]:
    """A block whose new events all take one instant: the time its first event is
    created, after the block loaded what it decides on (nested: the outer block's). Not
    on the store's first attempt, the hot path: there the one write that appends two
    events passes the first one's timestamp on (``SecretCommands``)."""
    token = _instant.set(_instant.get() or [])
    try:
        yield
    finally:
        _instant.reset(token)
