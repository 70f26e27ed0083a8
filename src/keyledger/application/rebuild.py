"""Rebuild every read model from the stream, atomically.

The rebuild runs in one write transaction: it holds the write lock, so no append can slip
between the replay and the switch, and readers keep seeing the old rows (WAL snapshot)
until it commits. The projection code is the same one that runs inline.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from keyledger.application.ledger import Ledger
from keyledger.infrastructure.sqlite_store import KeyledgerSQLiteRecorder
from keyledger.projections.schema import READ_MODEL_TABLES

PAGE_SIZE = 1000


def rebuild_read_models(ledger: Ledger, progress: Callable[[int], None] | None = None) -> int:
    """Drop the read models' rows and replay the stream into them; returns events replayed."""
    recorder = ledger.recorder
    assert isinstance(recorder, KeyledgerSQLiteRecorder)
    replayed = 0
    with recorder.datastore.get_connection(commit=True) as conn:
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            for table in READ_MODEL_TABLES:
                cur.execute(f"DELETE FROM {table}")
            cur.execute("UPDATE kl_tracking SET position=0")
            position = 0
            while True:
                cur.execute(
                    "SELECT rowid, originator_id, originator_version, topic, state "
                    f"FROM {recorder.events_table_name} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                    (position, PAGE_SIZE),
                )
                rows = cur.fetchall()
                if not rows:
                    break
                items = [
                    (
                        row[0],
                        ledger.mapper.to_domain_event(
                            StoredEvent(UUID(row[1]), row[2], row[3], row[4])
                        ),
                    )
                    for row in rows
                ]
                recorder.projector.apply(cur, items)
                position = rows[-1][0]
                replayed += len(rows)
                if progress:
                    progress(len(rows))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    return replayed
