"""The audit investigation part of ``SecretService``: trail, replay, export, seal, verify.

A mixin so that the facade stays one class for users while its modules stay small; it
validates and delegates like the rest of the facade.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from keyledger.application.export import EXPORT_FIELDS, audit_records, write_csv, write_jsonl
from keyledger.application.queries import NO_LIMIT
from keyledger.application.replay import state_as_of
from keyledger.application.sealing import checkpoints, seal, unsealed_count
from keyledger.application.secrets import actor_dict
from keyledger.application.verification import verify
from keyledger.context import current_scope, is_super_admin, make_actor
from keyledger.errors import InvalidInput, TenantRequired
from keyledger.models import AuditEntry, Checkpoint, SealResult, TenantState, VerifyReport
from keyledger.validation import (
    check_aware,
    check_callback,
    check_count,
    check_identifier,
    check_positions,
)

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger
    from keyledger.application.queries import Queries

__all__ = ["EXPORT_FIELDS", "AuditInvestigation", "write_csv", "write_jsonl"]


class AuditInvestigation:
    """Questions to the audit stream (mixed into ``SecretService``)."""

    _ledger: Ledger
    _queries: Queries

    def audit_trail(
        self,
        name: str,
        *,
        tenant_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        after_position: int | None = None,
    ) -> builtins.list[AuditEntry]:
        """Every audit entry of one secret, oldest first: versions stored, reads, denials,
        failures, status changes, re-encryptions, deletion. Tenant-scoped; ``tenant_id``
        only inside ``super_admin()``. ``limit`` and ``offset`` page through a long
        history (a secret read every second for a year has 31 million entries): oldest
        first, new entries only ever come after the last page, so pages do not shift.
        ``after_position`` (the last entry's position of the page before) reads the next
        page without counting the ones before it, as ``offset`` does."""
        if tenant_id is not None:
            if not is_super_admin():
                raise InvalidInput("tenant_id is only accepted inside super_admin()")
            scope_tenant = check_identifier("tenant_id", tenant_id)
        else:
            scope_tenant = current_scope().tenant_id
        return self._queries.audit_logs(
            tenant_id=scope_tenant,
            secret_name=check_identifier("name", name),
            action=None,
            result=None,
            user_id=None,
            since=None,
            until=None,
            limit=NO_LIMIT if limit is None else check_count("limit", limit) or 0,
            offset=check_count("offset", offset) or 0,
            ascending=True,
            after_position=check_count("after_position", after_position, allow_none=True),
        )

    def state_as_of(
        self, tenant_id: str, *, at: datetime | None = None, position: int | None = None
    ) -> TenantState:
        """The tenant's secrets (metadata, status, versions, access counts; never values)
        and key versions as they were at ``at`` or after stream ``position``, replayed
        from the stream alone. Exactly one of ``at`` and ``position``."""
        if (at is None) == (position is None):
            raise InvalidInput("give exactly one of at= and position=")
        return state_as_of(
            self._ledger,
            check_identifier("tenant_id", tenant_id),
            at=check_aware("at", at),
            position=check_count("position", position, allow_none=True),
        )

    def export_audit(
        self,
        *,
        tenant_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_position: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Stream the audited events after ``after_position`` as export records (see
        docs/audit.md). One tenant by name (an operator tool), or every tenant: a
        cross-tenant read, so only inside ``super_admin()``. ``progress(position)`` is
        called after each page with the last stream position it covered."""
        check_callback("progress", progress)
        if tenant_id is None and not is_super_admin():
            raise TenantRequired(
                "exporting every tenant's audit log needs super_admin(); or name a tenant"
            )
        return audit_records(
            self._ledger,
            tenant_id=None if tenant_id is None else check_identifier("tenant_id", tenant_id),
            since=check_aware("since", since),
            until=check_aware("until", until),
            after_position=check_count("after_position", after_position) or 0,
            progress=progress,
        )

    def seal_audit(
        self,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        accept_untagged: Iterable[int] = (),
    ) -> SealResult:
        """Append checkpoints sealing every event not sealed yet (see docs/audit.md).

        ``accept_untagged``: the stream positions of events that were investigated and
        are to be sealed as they are: untagged, or tagged with an audit key that is not
        configured (``verify_audit`` lists them); such an event at any other position
        stops the seal."""
        accept = check_positions("accept_untagged", accept_untagged)
        actor = actor_dict(make_actor(user_id, ip_address, user_agent))
        return seal(self._ledger, actor, accept_untagged=accept)

    def verify_audit(
        self, *, from_position: int = 0, anchor: builtins.list[Checkpoint] | None = None
    ) -> VerifyReport:
        """Check the stream against its checkpoints, event tags and an optional anchor."""
        if anchor is not None:
            iterable = isinstance(anchor, Iterable) and not isinstance(anchor, str | bytes)
            given = list(anchor) if iterable else None
            if given is None or not all(isinstance(item, Checkpoint) for item in given):
                raise InvalidInput("anchor must be a list of Checkpoint (audit_checkpoints())")
            anchor = given
        return verify(
            self._ledger,
            from_position=check_count("from_position", from_position) or 0,
            anchor=anchor,
        )

    def audit_checkpoints(self) -> builtins.list[Checkpoint]:
        """Every checkpoint of the seal chain, oldest first (export them as an anchor)."""
        return checkpoints(self._ledger)

    def unsealed_events(self) -> int:
        """How many events lie after the newest checkpoint."""
        return unsealed_count(self._ledger)
