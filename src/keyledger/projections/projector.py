"""Applies events to the read models; the same code inline and in a rebuild."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

from keyledger.domain.access import AuditRecord
from keyledger.domain.keyring import TenantKeyring
from keyledger.domain.secret import Secret
from keyledger.projections.audit_mapping import audit_facts
from keyledger.projections.schema import READ_MODEL_NAMES
from keyledger.projections.timeutil import optional_micros, to_micros


class Cursor(Protocol):
    """The slice of a DB-API cursor the projections use (``?`` placeholders)."""

    def execute(self, statement: str, params: Any = ...) -> Any: ...

    def fetchone(self) -> Any: ...


class Outcome:
    """What the projection learnt while applying a unit (e.g. the new access count)."""

    def __init__(self) -> None:
        self.access_count: int | None = None
        self.last_accessed_at: int | None = None


_CATALOG_UPSERT_FIELDS = (
    "status=?, deleted=0, category=?, description=?, metadata=?, version=?, key_version=?, "
    "expires_at=?, updated_at=?"
)


def _metadata(value: dict[str, str]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Projector:
    """Projects events into kl_catalog, kl_audit and kl_keys, and advances kl_tracking."""

    def apply(
        self, cur: Cursor, items: Iterable[tuple[int, object]], outcome: Outcome | None = None
    ) -> None:
        last = 0
        for position, event in items:
            self.apply_one(cur, position, event, outcome or Outcome())
            last = position
        if last:
            placeholders = ",".join("?" * len(READ_MODEL_NAMES))
            cur.execute(
                f"UPDATE kl_tracking SET position=? WHERE name IN ({placeholders})",
                (last, *READ_MODEL_NAMES),
            )

    def apply_one(self, cur: Cursor, position: int, event: object, outcome: Outcome) -> None:
        handler = getattr(self, "_on_" + type(event).__name__, None)
        if handler is not None:
            handler(cur, event, outcome)
        facts = audit_facts(event)
        if facts is not None:
            actor = facts.actor
            cur.execute(
                "INSERT INTO kl_audit (position, timestamp, tenant_id, secret_name, action, "
                "result, user_id, ip_address, user_agent, key_version, details) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    position,
                    to_micros(event.timestamp),  # type: ignore[attr-defined]
                    facts.tenant_id,
                    facts.secret_name,
                    facts.action,
                    facts.result,
                    actor.get("user_id") or "system",
                    actor.get("ip_address"),
                    actor.get("user_agent"),
                    facts.key_version,
                    json.dumps(facts.details, sort_keys=True, separators=(",", ":")),
                ),
            )

    # -- catalog ------------------------------------------------------------------------

    def _on_SecretCreated(self, cur: Cursor, e: Secret.SecretCreated, outcome: Outcome) -> None:  # noqa: N802
        ts = to_micros(e.timestamp)
        outcome.access_count, outcome.last_accessed_at = 0, None
        cur.execute(
            "INSERT INTO kl_catalog (secret_id, tenant_id, name, status, deleted, category, "
            "description, metadata, version, key_version, expires_at, created_at, updated_at, "
            "access_count, last_accessed_at) VALUES (?,?,?,'active',0,?,?,?,1,?,?,?,?,0,NULL)",
            (
                e.originator_id.hex,
                e.tenant_id,
                e.name,
                e.category,
                e.description,
                _metadata(e.metadata),
                e.key_version,
                optional_micros(e.expires_at),
                ts,
                ts,
            ),
        )

    def _on_SecretStored(self, cur: Cursor, e: Secret.SecretStored, outcome: Outcome) -> None:  # noqa: N802
        ts = to_micros(e.timestamp)
        fresh = ", created_at=?, access_count=0, last_accessed_at=NULL" if e.revived else ""
        params: tuple[Any, ...] = (
            e.status,
            e.category,
            e.description,
            _metadata(e.metadata),
            e.value_version,
            e.key_version,
            optional_micros(e.expires_at),
            ts,
        )
        if e.revived:
            params += (ts,)
        cur.execute(
            f"UPDATE kl_catalog SET {_CATALOG_UPSERT_FIELDS}{fresh} WHERE tenant_id=? AND name=? "
            "RETURNING access_count, last_accessed_at",
            (*params, e.tenant_id, e.name),
        )
        self._remember_access(cur, outcome)

    def _set_status(self, cur: Cursor, e: Secret.Event, status: str) -> None:
        cur.execute(
            "UPDATE kl_catalog SET status=CASE WHEN status='expired' THEN status ELSE ? END, "
            "updated_at=? WHERE tenant_id=? AND name=?",
            (status, to_micros(e.timestamp), e.tenant_id, e.name),
        )

    def _on_SecretDisabled(self, cur: Cursor, e: Secret.SecretDisabled, _: Outcome) -> None:  # noqa: N802
        self._set_status(cur, e, "disabled")

    def _on_SecretEnabled(self, cur: Cursor, e: Secret.SecretEnabled, _: Outcome) -> None:  # noqa: N802
        self._set_status(cur, e, "active")

    def _on_SecretExpired(self, cur: Cursor, e: Secret.SecretExpired, _: Outcome) -> None:  # noqa: N802
        cur.execute(
            "UPDATE kl_catalog SET status='expired' WHERE tenant_id=? AND name=?",
            (e.tenant_id, e.name),
        )

    def _on_SecretReencrypted(  # noqa: N802
        self, cur: Cursor, e: Secret.SecretReencrypted, _: Outcome
    ) -> None:
        cur.execute(
            "UPDATE kl_catalog SET key_version=? WHERE tenant_id=? AND name=?",
            (e.key_version, e.tenant_id, e.name),
        )

    def _on_SecretDeleted(self, cur: Cursor, e: Secret.SecretDeleted, _: Outcome) -> None:  # noqa: N802
        cur.execute(
            "UPDATE kl_catalog SET deleted=1, updated_at=? WHERE tenant_id=? AND name=?",
            (to_micros(e.timestamp), e.tenant_id, e.name),
        )

    def _on_SecretRead(self, cur: Cursor, e: AuditRecord.SecretRead, outcome: Outcome) -> None:  # noqa: N802
        cur.execute(
            "UPDATE kl_catalog SET access_count=access_count+1, last_accessed_at=? "
            "WHERE tenant_id=? AND name=? RETURNING access_count, last_accessed_at",
            (to_micros(e.timestamp), e.tenant_id, e.secret_name),
        )
        self._remember_access(cur, outcome)

    @staticmethod
    def _remember_access(cur: Cursor, outcome: Outcome) -> None:
        row = cur.fetchone()
        if row is not None:
            outcome.access_count, outcome.last_accessed_at = int(row[0]), row[1]

    # -- keys ---------------------------------------------------------------------------

    def _on_TenantKeyCreated(  # noqa: N802
        self, cur: Cursor, e: TenantKeyring.TenantKeyCreated, _: Outcome
    ) -> None:
        cur.execute(
            "INSERT INTO kl_keys (tenant_id, version, key_id, amk_id, status, created_at, "
            "retired_at) VALUES (?,1,?,?,'active',?,NULL)",
            (e.tenant_id, e.key_id, e.amk_id, to_micros(e.timestamp)),
        )

    def _on_KeyRotated(self, cur: Cursor, e: TenantKeyring.KeyRotated, _: Outcome) -> None:  # noqa: N802
        ts = to_micros(e.timestamp)
        if e.retired_version is not None:
            cur.execute(
                "UPDATE kl_keys SET status='retired', retired_at=? WHERE tenant_id=? AND version=?",
                (ts, e.tenant_id, e.retired_version),
            )
        cur.execute(
            "INSERT INTO kl_keys (tenant_id, version, key_id, amk_id, status, created_at, "
            "retired_at) VALUES (?,?,?,?,'active',?,NULL)",
            (e.tenant_id, e.version, e.key_id, e.amk_id, ts),
        )
