"""The audit read model: one row per audited event, keyed by stream position.

It is not written inline: it catches up from the stream before every audit query (and in
bulk after many writes), so the hot read path appends one event and touches two tables
instead of five. Catching up runs in maintenance transactions (one at a time: SQLite's
write lock, an advisory lock on PostgreSQL) and advances kl_tracking in the same
transaction, so no event is applied twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from keyledger._json import compact_encoder
from keyledger.projections.audit_mapping import audit_facts
from keyledger.projections.projector import UNTIMED, Cursor, tampered
from keyledger.projections.timeutil import instant_micros

AUDIT_TRACKING_NAME = "audit"


class AuditProjector:
    """Projects events into kl_audit and records the position reached in kl_tracking."""

    def apply(self, cur: Cursor, items: Sequence[tuple[int, object]]) -> None:
        rows = [row for position, event in items if (row := self.row(position, event))]
        last = items[-1][0] if items else None
        if rows and getattr(cur, "dialect", "sqlite") == "postgres":
            # One statement for the batch, its rows as eleven arrays: PostgreSQL then plans
            # once instead of once per row (executemany sends a statement per row).
            cur.execute(_PG_INSERT, [list(column) for column in zip(*rows, strict=True)])
        elif rows:
            cur.executemany(_INSERT, rows)
        if last is not None:
            cur.execute(
                "UPDATE kl_tracking SET position=? WHERE name=?", (last, AUDIT_TRACKING_NAME)
            )

    @staticmethod
    def row(position: int, event: object) -> tuple[object, ...] | None:
        """The kl_audit row of an event (None for events that are not audited)."""
        facts = audit_facts(event)
        if facts is None:
            return None
        at = instant_micros(event.timestamp)  # type: ignore[attr-defined]
        if at is None:  # (a row of it would fail every audit query: see instant_micros)
            raise tampered(position, UNTIMED)
        actor = facts.actor
        return (
            position,
            at,
            facts.tenant_id,
            facts.secret_name,
            facts.action,
            facts.result,
            actor.get("user_id") or "system",
            actor.get("ip_address"),
            actor.get("user_agent"),
            facts.key_version,
            _details(facts.details),
        )


# JSONEncoder(sort_keys=True, separators=(",", ":")).encode, its C encoder built once.
_details = compact_encoder(ensure_ascii=True, sort_keys=True)

_INSERT = (
    "INSERT INTO kl_audit (position, timestamp, tenant_id, secret_name, action, result, "
    "user_id, ip_address, user_agent, key_version, details) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)
_PG_INSERT = (
    "INSERT INTO kl_audit (position, timestamp, tenant_id, secret_name, action, result, "
    "user_id, ip_address, user_agent, key_version, details) SELECT * FROM unnest("
    "?::bigint[], ?::bigint[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], "
    "?::text[], ?::text[], ?::integer[], ?::text[])"
)
