"""The part of a write unit that is the same on every store: checks, material, projection."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from keyledger.errors import KeyInUse
from keyledger.infrastructure.read_events import PendingRead
from keyledger.infrastructure.write_unit import StaleStateError, WriteUnit
from keyledger.projections.catalog import CatalogProjector
from keyledger.projections.projector import Cursor

_PROJECTOR = CatalogProjector()


class KeyledgerRecorder(Protocol):
    """What the application needs of a store beyond the library's recorder interface."""

    events_table_name: str
    position_column: str
    dialect: Literal["sqlite", "postgres"]

    def id_param(self, aggregate_id: UUID) -> Any:
        """An aggregate id as the events table stores it."""

    def create_table(self) -> None:
        """Create the tables this recorder writes (idempotent)."""

    def reading(self) -> AbstractContextManager[Any]:
        """A read-only transaction over a consistent snapshot (``?``/``:name`` params)."""

    def writing(self) -> AbstractContextManager[Any]:
        """A transaction holding the events table's write lock."""

    def projecting(self) -> AbstractContextManager[Any]:
        """A transaction for read-model maintenance: maintainers take turns, but writers
        of events are not blocked where the store allows it (PostgreSQL)."""

    def hold_maintainers(self, cur: Any) -> None:
        """Inside ``writing()``: keep ``projecting()`` transactions out until it ends (a
        rebuild's switch replaces tables a catch-up writes)."""

    def insert_reads(self, batch: Sequence[PendingRead]) -> list[BaseException | None]:
        """Append a group-committed batch of read events in one transaction."""

    def shred(self) -> None:
        """Purge deleted key material from the database files (WAL, free pages)."""

    def backup(self, target: str) -> None:
        """Copy the whole store, one consistent snapshot, into the new file ``target``
        (SQLite; ``StorageError`` on PostgreSQL, whose tools back it up)."""

    def wait_for_events(self, seconds: float) -> None:
        """Block until new events may exist (NOTIFY on PostgreSQL) or ``seconds`` passed."""


def key_users(cur: Cursor, tenant_id: str, version: int) -> int:
    """The live secrets the catalog shows under key ``version`` of the tenant."""
    cur.execute(
        "SELECT COUNT(*) FROM kl_catalog WHERE tenant_id=? AND key_version=? AND deleted=0",
        (tenant_id, version),
    )
    return int(cur.fetchone()[0])


def write_unit_rest(cur: Cursor, unit: WriteUnit, positions: Sequence[int]) -> None:
    """Everything of ``unit`` after the event append, in the same transaction."""
    for tenant_id, version in unit.require_unused:
        in_use = key_users(cur, tenant_id, version)
        if in_use:
            raise KeyInUse.of(tenant_id, version, in_use)
    delete_key_material(cur, unit.material_deletions)
    for row in unit.material_rewraps:
        cur.execute(
            "UPDATE kl_key_material SET amk_id=?, wrapped=? "
            "WHERE tenant_id=? AND version=? AND key_id=?",
            (row.amk_id, row.wrapped, row.tenant_id, row.version, row.key_id),
        )
    if unit.material_rewraps:  # (deletions note it in delete_key_material)
        note_shred_pending(cur)
    for row in unit.key_material:
        cur.execute(
            "INSERT INTO kl_key_material (tenant_id, version, key_id, amk_id, wrapped, "
            "created_at) VALUES (?,?,?,?,?,?)",
            (row.tenant_id, row.version, row.key_id, row.amk_id, row.wrapped, row.created_at),
        )
    _PROJECTOR.apply(cur, zip(positions, unit.domain_events, strict=True), unit.outcome)


VersionsOf = Callable[[list[UUID]], dict[UUID, int]]


def stale_version(expected: Mapping[UUID, int], current: Mapping[UUID, int]) -> UUID | None:
    """The first of ``expected``'s aggregates that is no longer at its version, if any."""
    for aggregate_id, version in expected.items():
        if current.get(aggregate_id, 0) != version:
            return aggregate_id
    return None


def delete_key_material(cur: Cursor, rows: Sequence[tuple[str, int, str | None]]) -> None:
    """Delete material rows: (tenant, version, key_id), a key_id of None for all of them."""
    for tenant_id, version, key_id in rows:
        cur.execute(
            "DELETE FROM kl_key_material WHERE tenant_id=? AND version=? "
            "AND (CAST(? AS TEXT) IS NULL OR key_id=?)",
            (tenant_id, version, key_id, key_id),
        )
    if rows:
        note_shred_pending(cur)


# The row of kl_tracking that counts writes whose deleted or replaced key material may
# still be in the store's files: set in the transaction that deletes or replaces it,
# taken off by a shred that succeeded. A process killed between its commit and its shred
# leaves it set, and the next cleanup or rewrap (or `db shred`) shreds, although it has
# nothing to delete itself.
SHRED_PENDING = "shred_pending"
# How long a shred tries again while readers of older snapshots keep it from finishing
# (SQLite: a reader keeps the WAL from being truncated; PostgreSQL: VACUUM FULL keeps the
# row versions a snapshot may still see).
SHRED_PATIENCE_SECONDS = 5.0


def note_shred_pending(cur: Cursor) -> None:
    """(In the deleting transaction.) One more write awaiting a shred."""
    cur.execute(
        "INSERT INTO kl_tracking (name, position) VALUES (?, 1) ON CONFLICT (name) DO "
        # (a count left below zero by a release before 0.18.0 counts as nothing owed)
        "UPDATE SET position = CASE WHEN kl_tracking.position > 0 "
        "THEN kl_tracking.position + 1 ELSE 1 END",
        (SHRED_PENDING,),
    )


def check_expected(unit: WriteUnit, versions_of: VersionsOf) -> None:
    """Raise ``StaleStateError`` when an aggregate a decision read has moved on."""
    if unit.expected:
        stale = stale_version(unit.expected, versions_of(list(unit.expected)))
        if stale is not None:
            raise StaleStateError(stale)


def write_reads(
    cur: Cursor,
    batch: Sequence[PendingRead],
    *,
    versions_of: VersionsOf,
    append: Callable[[list[StoredEvent]], list[int]],
) -> list[BaseException | None]:
    """Write a group-committed batch of reads; returns each one's error (or None).

    A read whose decision is stale is refused alone (``StaleStateError``), the others are
    appended together and projected with one catalog statement.
    """
    current = versions_of(list({a for read in batch for a in read.expected}))
    errors: list[BaseException | None] = []
    accepted: list[PendingRead] = []
    for read in batch:
        stale = stale_version(read.expected, current)
        errors.append(None if stale is None else StaleStateError(stale))
        if stale is None:
            accepted.append(read)
    if not accepted:
        return errors
    positions = append([read.stored for read in accepted])
    for read, position in zip(accepted, positions, strict=True):
        read.position = position
    if len(accepted) == 1:  # a lone read: the plain one-row statement is cheaper
        CatalogProjector.apply_read(cur, accepted[0])
    else:
        _PROJECTOR.apply_reads(cur, accepted)
    return errors
