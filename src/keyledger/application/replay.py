"""Point-in-time replay: a tenant's secrets and keys as they were, from the stream alone.

The tenant's events are one range scan of the events table (ids carry the tenant prefix,
see ``domain/ids.py``); they are decoded and applied in stream order through the domain's
own ``mutate`` methods, exactly as the aggregates were built when those events were new.
Reads count into access counts as the catalog counts them (reset when a deleted name is
stored again). No read model, snapshot or cache is consulted, and no value is decrypted.

"As of a time" takes the events whose timestamp is at or before it, in stream order; "as
of a position" takes the events at or before that position.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from keyledger.application.stream import decoded, row_at_or_before, tenant_rows
from keyledger.domain.access import AuditRecord
from keyledger.domain.keyring import TenantKeyring
from keyledger.domain.secret import Secret, effective_status
from keyledger.models import KeyVersionAsOf, SecretInfo, SecretStatus, TenantState

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger


class _Reads:
    __slots__ = ("count", "last")

    def __init__(self) -> None:
        self.count = 0
        self.last: datetime | None = None


def state_as_of(
    ledger: Ledger, tenant_id: str, *, at: datetime | None, position: int | None
) -> TenantState:
    """The tenant's state after the events selected by ``at`` or ``position``."""
    aggregates: dict[UUID, Any] = {}
    reads: dict[str, _Reads] = {}
    applied, last_position, last_time = 0, 0, None
    for row in tenant_rows(ledger, tenant_id, upto=position):
        event: Any = decoded(ledger, row)
        if at is not None and event.timestamp > at:
            continue
        if getattr(event, "tenant_id", tenant_id) != tenant_id:
            continue  # another tenant whose 48-bit prefix collides with this one's
        applied, last_position, last_time = applied + 1, row.position, event.timestamp
        if isinstance(event, AuditRecord.SecretRead):
            counter = reads.setdefault(event.secret_name, _Reads())
            counter.count += 1
            counter.last = event.timestamp
        elif isinstance(event, Secret.SecretCreated | TenantKeyring.TenantKeyCreated):
            aggregates[row.originator_id] = event.mutate(None)
        elif isinstance(event, Secret.Event | TenantKeyring.Event):
            aggregate = aggregates.get(row.originator_id)
            if aggregate is not None:
                if isinstance(event, Secret.SecretStored) and event.revived:
                    reads.pop(event.name, None)
                aggregates[row.originator_id] = event.mutate(aggregate)
    instant = at or _time_at(ledger, position) or last_time
    secrets = sorted(
        (
            _secret(a, reads.get(a.name), instant)
            for a in aggregates.values()
            if isinstance(a, Secret) and not a.deleted
        ),
        key=lambda s: s.name,
    )
    keyring = next((a for a in aggregates.values() if isinstance(a, TenantKeyring)), None)
    keys = [] if keyring is None else [_key(k) for _, k in sorted(keyring.keys.items())]
    return TenantState(
        tenant_id=tenant_id,
        as_of=at,
        as_of_position=position,
        position=last_position,
        events_applied=applied,
        secrets=secrets,
        keys=keys,
    )


def _time_at(ledger: Ledger, position: int | None) -> datetime | None:
    """When the stream stood at ``position``: the time of its event there (or just before),
    whichever tenant it belongs to, so expiry is judged at that instant."""
    if position is None:
        return None
    row = row_at_or_before(ledger, position)
    if row is None:
        return None
    event: Any = decoded(ledger, row)
    return event.timestamp  # type: ignore[no-any-return]


def _secret(secret: Secret, reads: _Reads | None, instant: datetime | None) -> SecretInfo:
    status = (
        effective_status(secret.disabled, secret.expired, secret.expires_at, instant)
        if instant is not None
        else ("disabled" if secret.disabled else "active")
    )
    return SecretInfo.model_construct(  # fields straight from the aggregate: no validation
        name=secret.name,
        category=secret.category,
        description=secret.description,
        metadata=dict(secret.metadata),
        status=cast(SecretStatus, status),
        version=secret.value_version,
        key_version=secret.key_version,
        expires_at=secret.expires_at,
        created_at=secret.created_at,
        updated_at=secret.updated_at,
        access_count=reads.count if reads else 0,
        last_accessed_at=reads.last if reads else None,
    )


def _key(key: Any) -> KeyVersionAsOf:
    return KeyVersionAsOf.model_construct(
        version=key.version,
        status=key.status,
        key_id=key.key_id,
        amk_id=key.amk_id,
        created_at=key.created_at,
        retired_at=key.retired_at,
    )
