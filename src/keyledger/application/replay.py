"""Point-in-time replay: a tenant's secrets and keys as they were, from the stream alone.

The tenant's events are one range scan of the events table's primary key, read a page at
a time (ids carry the tenant prefix, see ``domain/ids.py``); each aggregate's events are
decoded and applied in version order through the domain's own ``mutate`` methods, exactly
as the aggregates were built when those events were new.
Reads count into access counts as the catalog counts them (reset when a deleted name is
stored again). No read model, snapshot or cache is consulted, and no value is decrypted.

"As of a time" takes, of each aggregate, its events up to the first one timed after it
(every event timed at or before it, unless clocks of different hosts disagree: an
aggregate's later version can then carry an earlier time, and applying it on a gap is
impossible); "as of a position" takes the events at or before that position.
"""

from __future__ import annotations

from array import array
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from keyledger.application.ledger import UNREPLAYABLE
from keyledger.application.stream import (
    decoded,
    row_at,
    row_at_or_before,
    rows_after,
    tenant_pages_by_aggregate,
)
from keyledger.domain.access import AuditRecord
from keyledger.domain.identity import derived_id
from keyledger.domain.keyring import TenantKeyring
from keyledger.domain.secret import Secret, effective_status
from keyledger.errors import AuditTampered
from keyledger.models import KeyVersionAsOf, SecretInfo, SecretStatus, TenantState
from keyledger.projections.timeutil import optional_datetime, to_micros

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger


class _Reads:
    """One secret name's reads, as (position, time) pairs in two compact arrays."""

    __slots__ = ("positions", "times")

    def __init__(self) -> None:
        self.positions = array("q")
        self.times = array("q")  # microseconds since the epoch

    def counted_after(self, revived_at: int) -> tuple[int, datetime | None]:
        """(how many reads came after position ``revived_at``, the time of the latest).

        The latest by time, not by position: reads are timed before they queue for the
        write lock, so a read timed earlier can be appended later, and the catalog keeps
        the latest time (``projections.catalog._LATEST``)."""
        count, latest = 0, 0
        for position, time in zip(self.positions, self.times, strict=True):
            if position > revived_at:
                count += 1
                latest = max(latest, time)
        return count, (optional_datetime(latest) if count else None)


def state_as_of(
    ledger: Ledger, tenant_id: str, *, at: datetime | None, position: int | None
) -> TenantState:
    """The tenant's state after the events selected by ``at`` or ``position``.

    The events are read in primary-key order, a page at a time (each aggregate's events
    in version order, which is all its state depends on), so memory does not grow with
    the tenant's history. Reads are kept as (position, time) per name and counted at the
    end, after the position where their name was last stored again after a deletion."""
    requested = position
    if position is not None:
        position = _end_of_write(ledger, position)
    aggregates: dict[UUID, Any] = {}
    reads: dict[str, _Reads] = {}
    revived: dict[str, int] = {}  # name -> position of its last revival
    applied, last_position, last_time = 0, 0, None
    stopped: set[UUID] = set()  # aggregates that met an event timed after ``at``
    at_position = 0  # (the event being applied, for the error below)
    try:
        for page in tenant_pages_by_aggregate(ledger, tenant_id, upto=position):
            for row in page:
                at_position = row.position
                event: Any = decoded(ledger, row)
                if at is not None and (event.timestamp > at or row.originator_id in stopped):
                    stopped.add(row.originator_id)  # (its later versions cannot apply alone)
                    continue
                _check_identity(event, row.originator_id)
                if getattr(event, "tenant_id", tenant_id) != tenant_id:
                    continue  # another tenant whose 48-bit prefix collides with this one's
                applied += 1
                if row.position > last_position:
                    last_position, last_time = row.position, event.timestamp
                if isinstance(event, AuditRecord.SecretRead):
                    counter = reads.get(event.secret_name)
                    if counter is None:
                        counter = reads[event.secret_name] = _Reads()
                    counter.positions.append(row.position)
                    counter.times.append(to_micros(event.timestamp))
                elif isinstance(event, Secret.SecretCreated | TenantKeyring.TenantKeyCreated):
                    aggregates[row.originator_id] = event.mutate(None)
                elif isinstance(event, Secret.Event | TenantKeyring.Event):
                    aggregate = aggregates.get(row.originator_id)
                    if aggregate is not None:
                        if isinstance(event, Secret.SecretStored) and event.revived:
                            revived[event.name] = row.position
                        aggregates[row.originator_id] = event.mutate(aggregate)
        instant = at or _time_at(ledger, position) or last_time
        secrets = sorted(
            (
                _secret(a, _counted(reads.get(a.name), revived.get(a.name, 0)), instant)
                for a in aggregates.values()
                if isinstance(a, Secret) and not a.deleted
            ),
            key=lambda s: s.name,
        )
        keyring = next((a for a in aggregates.values() if isinstance(a, TenantKeyring)), None)
        keys = [] if keyring is None else [_key(k) for _, k in sorted(keyring.keys.items())]
    except UNREPLAYABLE:  # an altered event the domain cannot apply (see event_shapes)
        raise AuditTampered(
            f"the events of tenant {tenant_id!r} cannot be replayed (at position "
            f"{at_position}): some were altered, deleted or reordered; run "
            "`keyledger audit verify`"
        ) from None
    return TenantState(
        tenant_id=tenant_id,
        as_of=at,
        as_of_position=requested,
        position=last_position,
        events_applied=applied,
        secrets=secrets,
        keys=keys,
    )


def _check_identity(event: Any, originator_id: UUID) -> None:
    """``ValueError`` (reported as tampering) unless a secret's or keyring's event
    carries the tenant and name its aggregate's id derives from. An event naming another
    tenant is that tenant's (their 48-bit id prefixes collide) only if so: one whose
    tenant was edited is not skipped as someone else's (its aggregate would replay
    without it). And events copied under another secret's id replayed as a second secret
    of the copied name (found by review; a retrieve refuses them: ``Ledger._get``)."""
    derived = derived_id(event)  # (None for a read record: its id is random)
    if derived is not None and derived[0] != originator_id:
        raise ValueError("an event names a tenant its aggregate does not belong to")


def _counted(reads: _Reads | None, revived_at: int) -> tuple[int, datetime | None]:
    return (0, None) if reads is None else reads.counted_after(revived_at)


def _end_of_write(ledger: Ledger, position: int) -> int:
    """The last position of the write that appended the event at ``position``.

    A write's events follow each other in the stream and share one timestamp
    (``domain/instant.py``): a replay up to an event in the middle of one (the compromise
    of an active key, before the rotation away from it) would show a state the store was
    never in. Reads of a group commit are separate writes, each with its own time."""
    row = row_at(ledger, position)
    if row is None:
        return position
    instant = decoded(ledger, row).timestamp
    end = position
    for page in rows_after(ledger, position, page_size=64):
        for following in page:
            if following.position != end + 1 or decoded(ledger, following).timestamp != instant:
                return end
            end = following.position
    return end


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


def _secret(
    secret: Secret, reads: tuple[int, datetime | None], instant: datetime | None
) -> SecretInfo:
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
        access_count=reads[0],
        last_accessed_at=reads[1],
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
