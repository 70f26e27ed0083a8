"""The part of a write unit that is the same on every store: checks, material, projection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol
from uuid import UUID

from keyledger.infrastructure.write_unit import StaleStateError, WriteUnit
from keyledger.projections.catalog import CatalogProjector
from keyledger.projections.projector import Cursor

_PROJECTOR = CatalogProjector()


class KeyledgerRecorder(Protocol):
    """What the application needs of a store beyond the library's recorder interface."""

    events_table_name: str
    position_column: str

    def id_param(self, aggregate_id: UUID) -> Any:
        """An aggregate id as the events table stores it."""

    def create_table(self) -> None:
        """Create the tables this recorder writes (idempotent)."""

    def reading(self) -> AbstractContextManager[Any]:
        """A read-only transaction over a consistent snapshot (``?``/``:name`` params)."""

    def writing(self) -> AbstractContextManager[Any]:
        """A transaction holding the events table's write lock."""

    def wait_for_events(self, seconds: float) -> None:
        """Block until new events may exist (NOTIFY on PostgreSQL) or ``seconds`` passed."""


def write_unit_rest(cur: Cursor, unit: WriteUnit, positions: Sequence[int]) -> None:
    """Everything of ``unit`` after the event append, in the same transaction."""
    for row in unit.key_material:
        cur.execute(
            "INSERT INTO kl_key_material (tenant_id, version, key_id, amk_id, wrapped, "
            "created_at) VALUES (?,?,?,?,?,?)",
            (row.tenant_id, row.version, row.key_id, row.amk_id, row.wrapped, row.created_at),
        )
    _PROJECTOR.apply(cur, zip(positions, unit.domain_events, strict=True), unit.outcome)


def check_expected(unit: WriteUnit, version_of: Callable[[UUID], int]) -> None:
    """Raise ``StaleStateError`` when an aggregate a decision read has moved on."""
    for aggregate_id, version in unit.expected.items():
        if version_of(aggregate_id) != version:
            raise StaleStateError(aggregate_id)
