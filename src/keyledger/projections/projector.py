"""The projection protocol: a cursor, an outcome, and the projectors' common shape; and
the errors of a replay that meets an event no keyledger write produces."""

from __future__ import annotations

from typing import Any, Protocol

from keyledger.errors import AuditTampered


class Cursor(Protocol):
    """The slice of a DB-API cursor the projections use (``?`` placeholders)."""

    def execute(self, statement: str, params: Any = ...) -> Any: ...

    def executemany(self, statement: str, params: Any) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Any: ...


class Outcome:
    """What the projection learnt while applying a unit (e.g. the new access count)."""

    def __init__(self, *, wanted: bool = True) -> None:
        self.wanted = wanted  # False in a replay: nobody reads it, so nothing is fetched
        self.access_count: int | None = None
        self.last_accessed_at: int | None = None


def tampered(position: int, what: str) -> AuditTampered:
    """The error for a replayed event that no keyledger write produces (``what`` it
    does), named by its position: a replay that met it would otherwise fail on a
    database constraint, or write a row no query can read back."""
    return AuditTampered(
        f"the event at position {position} {what}: it was altered, copied or forged in "
        "the store; run `keyledger audit verify`"
    )


UNTIMED = "holds a time that is no UTC instant (naive, or beyond the years 1 to 9999)"

# A replay that broke a read model's key on an event the projections' own checks could not
# name (``catalog._check_identity``): a creation stored twice once the events table lost
# its primary key, say.
REPEATED_ROWS = (
    "the stream holds an event the read models cannot take: it adds a secret or a key "
    "version a replay of the events before it had added already (an event copied within "
    "its aggregate, or stored twice); run `keyledger audit verify`"
)
