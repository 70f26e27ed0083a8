"""AuditRecord: one-event aggregates for reads, denials and failed operations.

Reads do not go on the Secret stream: a hot secret would make readers conflict and its
stream grow without bound. Each read, denial or failure is its own aggregate (one event,
an id time-ordered within its tenant's id range), so readers never conflict, and counts
are derived in the catalog read model.
Nothing ever loads these aggregates, so the factories below build their only event
directly (the same event the library's ``_create`` would build, without the aggregate).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from keyledger.domain.ids import ActorDict, audit_record_id
from keyledger.domain.instant import event_timestamp

E = TypeVar("E", bound=Aggregate.Created)


class AuditRecord(Aggregate):
    """An access or a failed operation, recorded as a single event."""

    class SecretRead(Aggregate.Created):
        """A value was returned to a caller (recorded before it was returned)."""

        tenant_id: str
        secret_name: str
        value_version: int
        key_version: int
        actor: ActorDict

    class SecretAccessDenied(Aggregate.Created):
        """A read was refused (disabled or expired)."""

        tenant_id: str
        secret_name: str
        reason: str
        key_version: int | None
        actor: ActorDict

    class OperationFailed(Aggregate.Created):
        """An operation on a secret or key failed; ``error`` is the error class name."""

        tenant_id: str
        secret_name: str | None
        action: str
        error: str
        key_version: int | None
        actor: ActorDict

    def __init__(self, **fields: object) -> None:
        self.fields = fields

    @classmethod
    def _event(cls, event_class: type[E], **fields: Any) -> E:
        return event_class(
            originator_id=audit_record_id(fields["tenant_id"]),
            originator_version=1,
            timestamp=event_timestamp(),  # the write's instant, inside one
            originator_topic=_TOPIC,
            **fields,
        )

    @classmethod
    def read(
        cls,
        tenant_id: str,
        secret_name: str,
        value_version: int,
        key_version: int,
        actor: ActorDict,
    ) -> AuditRecord.SecretRead:
        return cls._event(
            cls.SecretRead,
            tenant_id=tenant_id,
            secret_name=secret_name,
            value_version=value_version,
            key_version=key_version,
            actor=actor,
        )

    @classmethod
    def denied(
        cls,
        tenant_id: str,
        secret_name: str,
        reason: str,
        key_version: int | None,
        actor: ActorDict,
    ) -> AuditRecord.SecretAccessDenied:
        return cls._event(
            cls.SecretAccessDenied,
            tenant_id=tenant_id,
            secret_name=secret_name,
            reason=reason,
            key_version=key_version,
            actor=actor,
        )

    @classmethod
    def failed(
        cls,
        tenant_id: str,
        secret_name: str | None,
        action: str,
        error: str,
        key_version: int | None,
        actor: ActorDict,
    ) -> AuditRecord.OperationFailed:
        return cls._event(
            cls.OperationFailed,
            tenant_id=tenant_id,
            secret_name=secret_name,
            action=action,
            error=error,
            key_version=key_version,
            actor=actor,
        )


_TOPIC = get_topic(AuditRecord)


class ReadView(NamedTuple):
    """A ``SecretRead`` as projections see it, decoded straight from its stored bytes
    (``infrastructure/read_events.decode_read``) rather than rebuilt as the library's event
    object: reads are most of the stream, and the projections treat the two alike."""

    timestamp: datetime
    tenant_id: str
    secret_name: str
    value_version: int
    key_version: int
    actor: ActorDict
