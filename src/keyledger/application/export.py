"""Exporting the audit stream for other tools: one record per audited event, streamed.

The stream is read in pages of ``PAGE_SIZE`` events (one short read transaction each) and
each page is written out before the next is read, so memory stays flat on any stream.
Every record names its stream position; an interrupted export resumes with
``after_position`` set to the last position written.

Record schema (``EXPORT_FIELDS``, version ``EXPORT_SCHEMA_VERSION``; documented in
docs/audit.md): position, timestamp (ISO 8601, UTC), tenant_id, secret_name, action,
result, user_id, ip_address, user_agent, key_version, details (an object; in CSV, JSON
text), event_type, event_id, event_version. Checkpoints and snapshots are not audited
events and are not exported.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

from keyledger.application.read_models import check_positions_assigned
from keyledger.application.stream import decoded, rows_after
from keyledger.projections.audit_mapping import audit_facts

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger

EXPORT_SCHEMA_VERSION = 1
EXPORT_FIELDS = (
    "position",
    "timestamp",
    "tenant_id",
    "secret_name",
    "action",
    "result",
    "user_id",
    "ip_address",
    "user_agent",
    "key_version",
    "details",
    "event_type",
    "event_id",
    "event_version",
)


def audit_records(
    ledger: Ledger,
    *,
    tenant_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_position: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """The audited events after ``after_position``, in stream order, as export records
    (``since`` inclusive, ``until`` exclusive, on event time). ``progress(position)`` is
    called after each page with the last stream position the page covered."""
    # (PostgreSQL: refuses a stream holding a position its sequence never assigned, under
    # which a resumed export would miss every event appended since: see read_models. It
    # reads no read model: an export is evidence, and must not depend on one.)
    check_positions_assigned(ledger)
    for page in rows_after(ledger, after_position, tenant_id=tenant_id):
        for row in page:
            event: Any = decoded(ledger, row)
            facts = audit_facts(event)
            if facts is None or (tenant_id is not None and facts.tenant_id != tenant_id):
                continue
            timestamp = event.timestamp
            if (since is not None and timestamp < since) or (
                until is not None and timestamp >= until
            ):
                continue
            actor = facts.actor
            yield {
                "position": row.position,
                "timestamp": timestamp.isoformat(),
                "tenant_id": facts.tenant_id,
                "secret_name": facts.secret_name,
                "action": facts.action,
                "result": facts.result,
                "user_id": actor.get("user_id") or "system",
                "ip_address": actor.get("ip_address"),
                "user_agent": actor.get("user_agent"),
                "key_version": facts.key_version,
                "details": facts.details,
                "event_type": type(event).__qualname__,
                "event_id": str(row.originator_id),
                "event_version": row.version,
            }
        if progress is not None:
            progress(page[-1].position)


def write_jsonl(records: Iterator[dict[str, Any]], out: IO[str]) -> int:
    """Write one JSON object per line; returns the number of records."""
    count = 0
    for record in records:  # (one write a line: a record is in the buffer whole or not)
        out.write(json.dumps(record, sort_keys=False, default=str, separators=(",", ":")) + "\n")
        count += 1
    return count


# A cell a spreadsheet would read as a formula starts with one of these.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A CSV cell: None empty, and text that a spreadsheet would run as a formula (a user
    agent or a name that starts with ``=``, ``+``, ``-``, ``@``, tab or CR) behind a
    single quote, which spreadsheets show and do not run (OWASP's "CSV injection"). JSON
    lines are the export that keeps every value exactly."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(records: Iterator[dict[str, Any]], out: IO[str], *, header: bool = True) -> int:
    """Write RFC 4180 CSV with a header row; ``details`` as JSON text (see ``csv_cell``)."""
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(EXPORT_FIELDS)
    count = 0
    for record in records:
        row = dict(record, details=json.dumps(record["details"], default=str, sort_keys=True))
        writer.writerow([csv_cell(row[f]) for f in EXPORT_FIELDS])
        count += 1
    return count
