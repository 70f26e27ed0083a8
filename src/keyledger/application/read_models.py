"""Keeping the read models current: audit catch-up and full rebuilds from the stream.

Both replay stored events through the same projection code that runs inline, under the
write lock (``BEGIN IMMEDIATE``) so no append interleaves, and both advance kl_tracking in
the transaction that writes the rows: a crash leaves the old state, never a half-applied
one, and no event is applied twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from keyledger.projections.audit import AUDIT_TRACKING_NAME, AuditProjector
from keyledger.projections.catalog import CatalogProjector
from keyledger.projections.schema import READ_MODEL_TABLES

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger

PAGE_SIZE = 1000
Progress = Callable[[int], None]


def _replay(
    ledger: Ledger,
    cur: Any,
    after: int,
    apply: Callable[[list[tuple[int, object]]], None],
    progress: Progress | None = None,
) -> int:
    table, position = ledger.store.events_table_name, ledger.store.position_column
    replayed = 0
    while True:
        cur.execute(
            f"SELECT {position}, originator_id, originator_version, topic, state "
            f"FROM {table} WHERE {position} > ? ORDER BY {position} LIMIT ?",
            (after, PAGE_SIZE),
        )
        rows = cur.fetchall()
        if not rows:
            return replayed
        apply(
            [
                (
                    row[0],
                    ledger.mapper.to_domain_event(
                        StoredEvent(_uuid(row[1]), row[2], row[3], bytes(row[4]))
                    ),
                )
                for row in rows
            ]
        )
        after = rows[-1][0]
        replayed += len(rows)
        if progress:
            progress(len(rows))


def _uuid(value: object) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def audit_position(ledger: Ledger) -> tuple[int, int]:
    """(position the audit model reached, position of the stream head)."""
    table, position = ledger.store.events_table_name, ledger.store.position_column
    with ledger.reading() as cur:
        cur.execute("SELECT position FROM kl_tracking WHERE name=?", (AUDIT_TRACKING_NAME,))
        row = cur.fetchone()
        cur.execute(f"SELECT MAX({position}) FROM {table}")
        head = cur.fetchone()[0] or 0
    return (row[0] if row else 0), head


def catch_up_audit(ledger: Ledger) -> int:
    """Project every event after the audit model's position; returns events applied."""
    reached, head = audit_position(ledger)
    if reached >= head:
        return 0
    projector = AuditProjector()
    with ledger.writing() as cur:
        cur.execute("SELECT position FROM kl_tracking WHERE name=?", (AUDIT_TRACKING_NAME,))
        after = cur.fetchone()[0]
        return _replay(ledger, cur, after, lambda items: projector.apply(cur, items))


def rebuild_read_models(ledger: Ledger, progress: Progress | None = None) -> int:
    """Delete every read model's rows and replay the whole stream; returns events replayed."""
    catalog, audit = CatalogProjector(), AuditProjector()

    def apply(items: list[tuple[int, object]]) -> None:
        catalog.apply(cur, items)
        audit.apply(cur, items)

    with ledger.writing() as cur:
        for table in READ_MODEL_TABLES:
            cur.execute(f"DELETE FROM {table}")
        cur.execute("UPDATE kl_tracking SET position=0")
        return _replay(ledger, cur, 0, apply, progress)


def follow(
    ledger: Ledger,
    *,
    stop: Callable[[], bool],
    wait: Callable[[float], None],
    idle_seconds: float = 1.0,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Keep the lagging read models current until ``stop()``; returns events applied.

    ``wait(seconds)`` blocks until new events may exist (a NOTIFY on PostgreSQL, a plain
    sleep on SQLite) or the time is up. Each catch-up is one transaction that advances the
    tracking position with the rows, so a worker killed at any point resumes where its last
    commit left it and never applies an event twice.
    """
    applied = 0
    while not stop():
        count = catch_up_audit(ledger)
        applied += count
        if count and on_progress:
            on_progress(count)
        if not count:
            wait(idle_seconds)
    return applied
