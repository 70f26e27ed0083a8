"""The projection protocol: a cursor, an outcome, and the projectors' common shape."""

from __future__ import annotations

from typing import Any, Protocol


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
