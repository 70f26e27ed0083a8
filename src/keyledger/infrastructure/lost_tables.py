"""Read-model tables created anew in a store that already has events.

A read-model table lost by a bad migration or a partial restore was created again, empty,
by the next service that opened the store (or by `keyledger db init`, which `db check`
prescribes), and the store then reported itself healthy: listings and `exists` answered
"no secrets", the audit model claimed to be current while holding nothing of the past,
and later updates never brought catalog rows back (found by review). Creating them now
leaves word of what was lost, in the transaction that creates them:

- an audit model created anew catches up from the first event (its position set to 0);
  a tracking table created anew beside a surviving audit model resumes after its last
  row (the events after it that have no audit row have none to add);
- a catalog or key inventory created anew is marked (``CATALOG_LOST`` in kl_tracking):
  the ledger that opened the store rebuilds both from the stream before it serves a call
  (``Ledger.restore_lost_read_models``), and the rebuild's switch clears the mark.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from keyledger.projections.schema import READ_MODEL_TABLES

logger = logging.getLogger(__name__)

CATALOG_LOST = "catalog_lost"
AUDIT = "audit"  # (the audit model's row of kl_tracking: projections.audit)

Run = Callable[[str, tuple[Any, ...]], list[Any]]  # (statement with ? marks, params) -> rows


def settle_recreated(run: Run, present: Collection[str], events_table: str) -> None:
    """After the schema statements ran: ``present`` names the tables there before."""
    tables = (*READ_MODEL_TABLES, "kl_tracking", "kl_key_material")
    lost = {table for table in tables if table not in present}
    if not lost or events_table not in present:
        return  # nothing lost, or a new store
    if not run(f"SELECT 1 FROM {events_table} LIMIT 1", ()):
        return  # no event yet: empty read models are right
    if "kl_audit" in lost:
        run("UPDATE kl_tracking SET position = 0 WHERE name = ?", (AUDIT,))
    elif "kl_tracking" in lost:
        run(
            "UPDATE kl_tracking SET position = (SELECT COALESCE(MAX(position), 0) "
            "FROM kl_audit) WHERE name = ?",
            (AUDIT,),
        )
    if "kl_key_material" in lost:
        # Not a read model: the wrapped keys themselves, which no replay gives back.
        logger.error(
            "the table kl_key_material was missing from a store that has events, and was "
            "created anew, empty: every key version created before it is unusable, and "
            "every secret under one undecryptable, until its rows are restored from a "
            "backup (docs/operations.md section 6); `keyledger db check` counts them"
        )
    if lost & {"kl_catalog", "kl_keys"}:
        run(
            "INSERT INTO kl_tracking (name, position) VALUES (?, 1) "
            "ON CONFLICT (name) DO UPDATE SET position = 1",
            (CATALOG_LOST,),
        )


def catalog_lost(cur: Any) -> bool:
    """Whether kl_tracking holds the mark of a catalog created anew and not yet rebuilt."""
    cur.execute("SELECT position FROM kl_tracking WHERE name = ?", (CATALOG_LOST,))
    row = cur.fetchone()
    return row is not None and bool(row[0])
