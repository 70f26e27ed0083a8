"""Drift repair (SPEC section 5): destructive only with confirmation, always audited.

Destructive work (deleting unrecoverable secrets, destroying unusable key versions) is one
transaction with the ``repair`` event, so a repair killed midway has either done all of
it or none; non-destructive fixes (re-wrap, re-encrypt, catch up, delete orphaned
material) run after. Read models that disagree with the stream are rebuilt first, so
deletions are only ever planned on consistent ones.
A missing master key never leads to anything being deleted: its diagnosis marks nothing
destructive.
"""

from __future__ import annotations

from collections.abc import Callable

from keyledger.application.drift import DELETE_KEY, DELETE_MATERIAL, DELETE_SECRET, diagnose
from keyledger.application.ledger import Ledger
from keyledger.application.lifecycle import KeyLifecycle
from keyledger.application.read_models import catch_up_audit, rebuild_read_models
from keyledger.application.secrets import actor_dict
from keyledger.context import Actor
from keyledger.domain.secret import Secret
from keyledger.errors import ConfirmationRequired
from keyledger.infrastructure.write_unit import WriteUnit
from keyledger.models import DriftIssue, RepairResult


def _plan(issues: list[DriftIssue]) -> tuple[list[str], list[int]]:
    secrets = sorted(
        {i.secret_name for i in issues if i.repair_action == DELETE_SECRET and i.secret_name}
    )
    versions = sorted(
        {
            i.key_version
            for i in issues
            if i.repair_action == DELETE_KEY and i.key_version is not None
        }
    )
    return secrets, versions


def repair(
    ledger: Ledger,
    lifecycle: KeyLifecycle,
    reencrypt: Callable[[str, Actor], object],
    tenant_id: str,
    *,
    dry_run: bool,
    confirm: bool,
    actor: Actor,
) -> RepairResult:
    """Repair one tenant's drift; see the module docstring for the rules."""
    before = diagnose(ledger, tenant_id).issues
    if not dry_run and any(i.code == "read_model_inconsistent_with_stream" for i in before):
        # Plan deletions only on read models that agree with the stream.
        rebuild_read_models(ledger)
        before = diagnose(ledger, tenant_id).issues
    secrets, versions = _plan(before)
    result = {
        "tenant_id": tenant_id,
        "issues_before": before,
        "would_delete_secrets": len(secrets),
        "would_delete_tenant_encryption_keys": len(versions),
        "secret_names": secrets,
        "key_versions": versions,
    }
    if dry_run:
        return RepairResult(
            dry_run=True,
            remaining_issues=before,
            deleted_secrets=0,
            deleted_tenant_encryption_keys=0,
            **result,
        )
    if (secrets or versions) and not confirm:
        raise ConfirmationRequired(
            f"repairing tenant {tenant_id!r} deletes {len(secrets)} unrecoverable secret(s) "
            f"and {len(versions)} unusable key version(s): pass "
            "confirm_delete_unrecoverable_data=True (or run a dry run first)"
        )
    if ledger.keyring(tenant_id, fresh=True) is None and not before:
        return RepairResult(
            dry_run=False,
            remaining_issues=[],
            deleted_secrets=0,
            deleted_tenant_encryption_keys=0,
            **result,
        )
    _record(ledger, tenant_id, before, secrets, versions, actor)
    removed = _fix_without_deleting(ledger, lifecycle, reencrypt, tenant_id, before, actor)
    if versions or removed:  # once, after every step: an incomplete shred stops none of them
        ledger.shred()
    return RepairResult(
        dry_run=False,
        remaining_issues=diagnose(ledger, tenant_id).issues,
        deleted_secrets=len(secrets),
        deleted_tenant_encryption_keys=len(versions),
        **result,
    )


def _record(
    ledger: Ledger,
    tenant_id: str,
    issues: list[DriftIssue],
    secrets: list[str],
    versions: list[int],
    actor: Actor,
) -> None:
    """One transaction: the repair entry, each secret deleted, each version destroyed."""
    who = actor_dict(actor)
    codes = sorted({issue.code for issue in issues})

    def attempt(n: int) -> None:
        keyring = ledger.keyring(tenant_id, fresh=n > 0)
        if keyring is None:
            return
        changed = ledger.for_update(keyring)
        for version in versions:
            if changed.keys[version].status != "destroyed":
                changed.destroy(version, "drift repair: unusable", who)
        deleted: list[Secret] = []
        for name in secrets:
            secret = ledger.secret(tenant_id, name, fresh=n > 0)
            if secret is not None and not secret.deleted:
                doomed = ledger.for_update(secret)
                doomed.delete(who)
                deleted.append(doomed)
        changed.record_repair(codes, secrets, versions, who)
        unit = WriteUnit(material_deletions=[(tenant_id, v, None) for v in versions])
        ledger.commit(changed, *deleted, unit=unit)

    ledger.retrying(attempt)
    if versions:
        ledger.forget_data_keys()  # the store is shredded at the end of the repair


def _fix_without_deleting(
    ledger: Ledger,
    lifecycle: KeyLifecycle,
    reencrypt: Callable[[str, Actor], object],
    tenant_id: str,
    issues: list[DriftIssue],
    actor: Actor,
) -> bool:
    """The repairs that delete no data; whether key material was removed or replaced."""
    removed = False
    codes = {issue.code for issue in issues}
    if "active_tenant_encryption_key_amk_mismatch" in codes:
        removed = lifecycle.rewrap(actor, tenant_id=tenant_id, shred=False).rewrapped > 0
    stray = [
        (tenant_id, issue.key_version, issue.details.get("key_id"))
        for issue in issues
        if issue.repair_action == DELETE_MATERIAL and issue.key_version is not None
    ]
    if stray:
        ledger.delete_key_material(stray)
        removed = True
    if "secret_on_retired_key" in codes and ledger.master_keys.current is not None:
        reencrypt(tenant_id, actor)  # (keyless, it would refuse: amk_unavailable remains)
    if "projection_behind" in codes:
        catch_up_audit(ledger)
    return removed
