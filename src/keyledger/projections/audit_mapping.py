"""How each stored event reads as an audit entry (action, result, key version, details)."""

from __future__ import annotations

from typing import Any, NamedTuple

from keyledger.domain.access import AuditRecord, ReadView
from keyledger.domain.keyring import TenantKeyring
from keyledger.domain.secret import Secret


class AuditFacts(NamedTuple):
    """The audit view of one event (a named tuple: one is built per audited event when
    the audit model catches up, at a third of a frozen dataclass's cost)."""

    tenant_id: str
    secret_name: str | None
    action: str
    result: str
    key_version: int | None
    details: dict[str, Any]
    actor: dict[str, Any]


def audit_facts(event: object) -> AuditFacts | None:
    """The audit entry for ``event``; None for events that are not audited (snapshots)."""
    handler = _HANDLERS.get(type(event))
    return None if handler is None else handler(event)


def _secret(action: str, event: Any, key_version: int | None = None, **details: Any) -> AuditFacts:
    return AuditFacts(
        event.tenant_id, event.name, action, "success", key_version, details, event.actor
    )


def _stored(e: Any) -> AuditFacts:
    action = "create" if e.revived else "update"
    return _secret(action, e, e.key_version, version=e.value_version)


def _reencrypted(e: Any) -> AuditFacts:
    return _secret(
        "update", e, e.key_version, reencrypted=True, previous_key_version=e.previous_key_version
    )


def _key_created(e: Any) -> AuditFacts:
    details = {"key_id": e.key_id, "amk_id": e.amk_id}
    return AuditFacts(e.tenant_id, None, "create_key", "success", 1, details, e.actor)


def _key_rotated(e: Any) -> AuditFacts:
    details = {"key_id": e.key_id, "amk_id": e.amk_id, "retired_version": e.retired_version}
    return AuditFacts(e.tenant_id, None, "rotate_key", "success", e.version, details, e.actor)


def _key(action: str, e: Any, version: int | None, **details: Any) -> AuditFacts:
    return AuditFacts(e.tenant_id, None, action, "success", version, details, e.actor)


def _read(e: Any) -> AuditFacts:
    details = {"version": e.value_version}
    return AuditFacts(
        e.tenant_id, e.secret_name, "read", "success", e.key_version, details, e.actor
    )


def _denied(e: Any) -> AuditFacts:
    details = {"reason": e.reason}
    return AuditFacts(e.tenant_id, e.secret_name, "read", "denied", e.key_version, details, e.actor)


def _failed(e: Any) -> AuditFacts:
    details = {"error": e.error}
    return AuditFacts(
        e.tenant_id, e.secret_name, e.action, "failure", e.key_version, details, e.actor
    )


_HANDLERS: dict[type, Any] = {
    Secret.SecretCreated: lambda e: _secret("create", e, e.key_version, version=1),
    Secret.SecretStored: _stored,
    Secret.SecretDisabled: lambda e: _secret("disable", e),
    Secret.SecretEnabled: lambda e: _secret("enable", e),
    Secret.SecretExpired: lambda e: _secret("expire", e),
    Secret.SecretReencrypted: _reencrypted,
    Secret.SecretDeleted: lambda e: _secret("delete", e),
    TenantKeyring.TenantKeyCreated: _key_created,
    TenantKeyring.KeyRotated: _key_rotated,
    TenantKeyring.KeyCompromised: lambda e: _key("compromise_key", e, e.version, reason=e.reason),
    TenantKeyring.KeyDestroyed: lambda e: _key("destroy_key", e, e.version, reason=e.reason),
    TenantKeyring.KeyRewrapped: lambda e: _key(
        "rewrap_key", e, e.version, amk_id=e.amk_id, previous_amk_id=e.previous_amk_id
    ),
    TenantKeyring.TenantErased: lambda e: _key(
        "erase_tenant", e, None, versions=e.versions, reason=e.reason
    ),
    TenantKeyring.DriftRepaired: lambda e: _key(
        "repair",
        e,
        None,
        issue_codes=e.issue_codes,
        deleted_secrets=e.deleted_secrets,
        destroyed_versions=e.destroyed_versions,
    ),
    AuditRecord.SecretRead: _read,
    ReadView: _read,
    AuditRecord.SecretAccessDenied: _denied,
    AuditRecord.OperationFailed: _failed,
}
