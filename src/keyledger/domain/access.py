"""AuditRecord: one-event aggregates for reads, denials and failed operations.

Reads do not go on the Secret stream: a hot secret would make readers conflict and its
stream grow without bound. Each read, denial or failure is its own aggregate (random id,
one event), so readers never conflict, and counts are derived in the catalog read model.
"""

from __future__ import annotations

from eventsourcing.domain import Aggregate

from keyledger.domain.ids import ActorDict, time_ordered_id


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
    def read(
        cls,
        tenant_id: str,
        secret_name: str,
        value_version: int,
        key_version: int,
        actor: ActorDict,
    ) -> AuditRecord:
        return cls._create(
            cls.SecretRead,
            id=time_ordered_id(),
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
    ) -> AuditRecord:
        return cls._create(
            cls.SecretAccessDenied,
            id=time_ordered_id(),
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
    ) -> AuditRecord:
        return cls._create(
            cls.OperationFailed,
            id=time_ordered_id(),
            tenant_id=tenant_id,
            secret_name=secret_name,
            action=action,
            error=error,
            key_version=key_version,
            actor=actor,
        )
