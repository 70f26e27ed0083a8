"""Drift repair (SPEC section 5): destructive only with confirmation, always audited.

Destructive work (deleting unrecoverable secrets, destroying unusable key versions) is one
transaction with the ``repair`` event, so a repair killed midway has either done all of
it or none; non-destructive fixes (re-wrap, re-encrypt, catch up, delete orphaned
material) run after. Read models that disagree with the stream are rebuilt first, so
deletions are only ever planned on consistent ones; the diagnosis confirms each secret it
marks unrecoverable against the secret's aggregate (a catalog row that disagrees makes the
read models inconsistent), and the deletion checks the aggregate again, so no secret is
deleted on a read model's word alone.
A missing master key never leads to anything being deleted: its diagnosis marks nothing
destructive.
"""

from __future__ import annotations

from collections.abc import Callable

from keyledger.application.drift import DELETE_KEY, DELETE_MATERIAL, DELETE_SECRET, diagnose
from keyledger.application.ledger import Conflict, Ledger
from keyledger.application.lifecycle import KeyLifecycle, shred_reporting
from keyledger.application.read_models import (
    catch_up_audit,
    owner_needed,
    rebuild_read_models,
)
from keyledger.application.secrets import actor_dict
from keyledger.context import Actor
from keyledger.domain.secret import Secret
from keyledger.errors import ConfirmationRequired
from keyledger.infrastructure.write_unit import WriteUnit
from keyledger.models import DriftIssue, RepairResult

# A secret to delete as the diagnosis found it: (its value version, its key version).
Found = tuple[int | None, int | None]


def _plan(issues: list[DriftIssue]) -> tuple[dict[str, Found], list[int]]:
    """(each secret to delete: the value and key versions found unrecoverable; versions to
    destroy)."""
    secrets = {
        i.secret_name: (i.details.get("value_version"), i.key_version)
        for i in sorted(issues, key=lambda i: i.secret_name or "")
        if i.repair_action == DELETE_SECRET and i.secret_name
    }
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
    confirmed: RepairResult | None = None,
) -> RepairResult:
    """Repair one tenant's drift; see the module docstring for the rules. ``confirmed``:
    a dry run whose plan bounds what may be deleted (see the service)."""
    report = diagnose(ledger, tenant_id)
    if not dry_run and any(i.code == "read_model_inconsistent_with_stream" for i in report.issues):
        # Plan deletions only on read models that agree with the stream.
        with owner_needed(
            "the read models disagree with the stream, and the repair's rebuild of them "
            "(`keyledger projections rebuild`)",
            then=", then the repair again",
        ):
            rebuild_read_models(ledger)
        report = diagnose(ledger, tenant_id)
    before = report.issues
    live = int(report.summary["active_secret_count"])
    secrets, versions = _plan(before)
    result = {
        "tenant_id": tenant_id,
        "issues_before": before,
        "would_delete_secrets": len(secrets),
        "would_delete_tenant_encryption_keys": len(versions),
        "secret_names": list(secrets),
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
    if confirmed is not None and (secrets or versions):
        unconfirmed = sorted(set(secrets) - set(confirmed.secret_names))
        versions_unconfirmed = sorted(set(versions) - set(confirmed.key_versions))
        if confirmed.tenant_id != tenant_id or unconfirmed or versions_unconfirmed:
            raise ConfirmationRequired(
                f"the repair of tenant {tenant_id!r} would now also delete "
                f"{len(unconfirmed)} secret(s) and {len(versions_unconfirmed)} key "
                "version(s) that the confirmed plan did not name; nothing was changed: "
                "review a new dry run"
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
    deleted, destroyed = _record(ledger, tenant_id, before, secrets, versions, live, actor)
    removed = _fix_without_deleting(ledger, lifecycle, reencrypt, tenant_id, before, actor)
    # What this run did (another repair at once may have done part of the plan).
    result |= {"secret_names": deleted, "key_versions": destroyed}
    repaired = RepairResult(
        dry_run=False,
        remaining_issues=diagnose(ledger, tenant_id).issues,
        deleted_secrets=len(deleted),
        deleted_tenant_encryption_keys=len(destroyed),
        **result,
    )
    # Once, after every step: an incomplete shred stops none of them, and carries what
    # they did (the CLI reports it before the error).
    if versions or removed or ledger.shred_pending():
        shred_reporting(ledger, repaired)
    return repaired


def _record(
    ledger: Ledger,
    tenant_id: str,
    issues: list[DriftIssue],
    secrets: dict[str, Found],
    versions: list[int],
    live: int,
    actor: Actor,
) -> tuple[list[str], list[int]]:
    """One transaction: the repair entry, each secret deleted, each version destroyed,
    and, when the active version is among them and some of the ``live`` secrets remain
    (on healthy retired versions), a fresh active version, so that they are re-encrypted
    onto it at once and the tenant is left without drift. Returns the names deleted.

    A secret is deleted only while its aggregate holds what the diagnosis found
    unrecoverable (same value version, same key version): a value stored afresh since, as
    the drift error tells clients to do, is kept, and so is one re-encrypted since (its
    value was readable after all); the aggregate, not the catalog, decides. The secrets
    and the keyring are written with the versions they were loaded at, so a change in
    between makes the attempt start again on fresh state.
    Returns the names deleted and the versions destroyed by this run: a version another
    repair destroyed meanwhile is neither destroyed nor recorded again (found by review:
    two repairs at once each recorded and reported it)."""
    who = actor_dict(actor)
    codes = sorted({issue.code for issue in issues})
    deleted_names: list[str] = []
    destroyed_versions: list[int] = []

    def attempt(n: int) -> None:
        keyring = ledger.keyring(tenant_id, fresh=n > 0)
        if keyring is None:
            return
        changed = ledger.for_update(keyring)
        active = changed.active
        destroyed = [v for v in versions if changed.keys[v].status != "destroyed"]
        for version in destroyed:
            changed.destroy(version, "drift repair: unusable", who)
        deleted: list[Secret] = []
        for name, (value_version, key_version) in secrets.items():
            secret = ledger.secret(tenant_id, name, fresh=n > 0)
            skip = (
                secret is None
                or secret.deleted
                or (value_version is not None and secret.value_version != value_version)
                or (key_version is not None and secret.key_version != key_version)
            )
            if skip and n == 0:  # decided on a cached copy, which may be stale (another
                raise Conflict  # process stored or re-created it): look again
            if skip:
                continue  # gone, or written since the diagnosis: not unrecoverable
            assert secret is not None
            doomed = ledger.for_update(secret)
            doomed.delete(who)
            deleted.append(doomed)
        names = [secret.name for secret in deleted]
        changed.record_repair(codes, names, destroyed, who)
        unit = WriteUnit(material_deletions=[(tenant_id, v, None) for v in versions])
        fresh_key = None
        if active is not None and active.version in destroyed and live > len(deleted):
            fresh_key, row = ledger.new_data_key(tenant_id, changed.next_version)
            changed.rotate(fresh_key.fingerprint, row.amk_id, who)
            unit.key_material.append(row)
        ledger.commit(changed, *deleted, unit=unit)
        if fresh_key is not None:
            ledger.remember_data_key(fresh_key)
        deleted_names[:] = names
        destroyed_versions[:] = destroyed

    ledger.retrying(attempt)
    if versions:
        ledger.forget_data_keys()  # the store is shredded at the end of the repair
    return deleted_names, destroyed_versions


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
