"""``keyledger drift``: diagnose how tenants' secrets and keys drifted apart, and repair it.

A diagnosis never decrypts a value. A repair deletes only what is unrecoverable, and only
after a confirmation (or --yes); so does one that re-wraps keys under the current master
key (it shreds the old copies). Any other repair needs none.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from keyledger.application.drift import DELETE_MATERIAL
from keyledger.cli.confirm import confirm as ask
from keyledger.cli.errors import KeyledgerSubgroup, despite_shred
from keyledger.cli.render import emit_json, emit_table, json_option, shell_word, text, to_data
from keyledger.cli.root import CliContext, pass_cli
from keyledger.context import super_admin
from keyledger.models import DriftIssue, DriftReport, RepairResult
from keyledger.validation import check_identifier

ISSUE_HEADERS = ("CODE", "SEVERITY", "SECRET", "VERSION", "REPAIR", "MESSAGE")
SEVERITIES = ("error", "warning", "info")


@click.group("drift", cls=KeyledgerSubgroup)
def drift_group() -> None:
    """Diagnose and repair drift between tenants' secrets and their keys."""


def issue_row(issue: DriftIssue) -> tuple[str, ...]:
    """One row of the issues table."""
    return (
        issue.code,
        issue.severity,
        text(issue.secret_name),
        text(issue.key_version),
        issue.repair_action,
        issue.message,
    )


def counts(issues: Sequence[DriftIssue]) -> str:
    """``2 error(s), 0 warning(s), 1 info``."""
    found = {severity: sum(i.severity == severity for i in issues) for severity in SEVERITIES}
    return f"{found['error']} error(s), {found['warning']} warning(s), {found['info']} info"


def errors_in(issues: Sequence[DriftIssue]) -> int:
    """How many issues are errors."""
    return sum(issue.severity == "error" for issue in issues)


def all_tenant_ids(cli: CliContext) -> list[str]:
    """Every tenant that has (or had) a key version."""
    with super_admin():
        infos = cli.service.list_keys()
    return sorted({info.tenant_id for info in infos})


@drift_group.command("diagnose")
@click.argument("tenant_id", metavar="[TENANT]", required=False)
@click.option("--all-tenants", is_flag=True, help="Diagnose every tenant that has keys.")
@click.option(
    "--secret",
    "secret_names",
    multiple=True,
    metavar="NAME",
    help="Only check this secret (repeatable); key-level checks always run.",
)
@json_option
@pass_cli
def diagnose(
    cli: CliContext, tenant_id: str | None, all_tenants: bool, secret_names: tuple[str, ...]
) -> None:
    """Diagnose TENANT (or every tenant) for drift between secrets and keys.

    Reads the read models and tests key versions by unwrapping them; never decrypts a value.
    Exits 0 when no report has an error (warnings and info are fine), 1 otherwise.
    """
    if tenant_id is not None and all_tenants:
        raise click.UsageError("give TENANT or --all-tenants, not both")
    if tenant_id is None and not all_tenants:
        raise click.UsageError("give TENANT or --all-tenants")
    service = cli.service
    if tenant_id is not None:
        cli.refuse_unknown_tenant(tenant_id)
        refuse_unknown_secrets(cli, tenant_id, secret_names)
    tenant_ids = [tenant_id] if tenant_id is not None else all_tenant_ids(cli)
    names = list(secret_names) or None
    reports = [service.diagnose_tenant_secret_key_drift(t, names) for t in tenant_ids]
    if cli.json_output:
        emit_json(to_data(reports[0]) if tenant_id is not None else [to_data(r) for r in reports])
    elif tenant_id is not None:
        emit_report(reports[0])
    else:
        emit_reports(reports)
    failing = [report.tenant_id for report in reports if not report.ok]
    if failing:
        raise click.ClickException(
            f"drift errors in tenant(s) {', '.join(map(repr, failing))}; "
            "`keyledger drift repair TENANT --dry-run` shows the repair plan"
        )


def refuse_unknown_secrets(cli: CliContext, tenant_id: str, names: Sequence[str]) -> None:
    """A --secret the tenant has no live secret of is an error, not an "ok" (found by
    review: a mistyped name was reported free of drift)."""
    if not names:
        return
    for name in names:
        check_identifier("secret name", name)  # (a malformed name says so first)
    known = {
        info.name
        for info in cli.service.list_for_tenant(tenant_id, status=None, include_expired=True)
    }
    unknown = [name for name in names if name not in known]
    if unknown:
        raise click.ClickException(
            f"no secret {unknown[0]!r} in tenant {tenant_id!r}: check the name"
        )


def emit_report(report: DriftReport) -> None:
    """One tenant: its issues table (when it has issues) and a verdict line."""
    if report.issues:
        emit_table(ISSUE_HEADERS, [issue_row(issue) for issue in report.issues])
    verdict = "ok" if report.ok else "NOT OK"
    click.echo(f"Tenant {report.tenant_id!r}: {verdict} ({counts(report.issues)}).")


def emit_reports(reports: Sequence[DriftReport]) -> None:
    """Every tenant: one issues table with a TENANT column, then a verdict line."""
    rows = [(r.tenant_id, *issue_row(issue)) for r in reports for issue in r.issues]
    if rows:
        emit_table(("TENANT", *ISSUE_HEADERS), rows)
    failing = sum(not report.ok for report in reports)
    click.echo(f"Checked {len(reports)} tenant(s): {failing} with drift errors.")


def what(count: int, noun: str, items: Sequence[object]) -> str:
    """``2 unrecoverable secret(s) ('a', 'b')``: a count and, when any, the items."""
    listed = ", ".join(repr(item) if isinstance(item, str) else str(item) for item in items)
    return f"{count} {noun}" + (f" ({listed})" if listed else "")


def deletion_plan(plan: RepairResult) -> str:
    """What a repair deletes, in words."""
    secrets = what(plan.would_delete_secrets, "unrecoverable secret(s)", plan.secret_names)
    versions = what(
        plan.would_delete_tenant_encryption_keys, "unusable key version(s)", plan.key_versions
    )
    return f"{secrets} and {versions}"


def deletes(plan: RepairResult) -> bool:
    """True when the plan deletes secrets or destroys key versions."""
    return bool(plan.would_delete_secrets or plan.would_delete_tenant_encryption_keys)


REWRAP_CODE = "active_tenant_encryption_key_amk_mismatch"


def rewraps(plan: RepairResult) -> bool:
    """True when the repair re-wraps key versions under the current master key."""
    return any(issue.code == REWRAP_CODE for issue in plan.issues_before)


def other_steps(plan: RepairResult, master_key_id: str | None) -> list[str]:
    """The repair's steps that change keys or secrets without deleting any, in words.
    The plan and the result said only what was deleted: a repair that re-wrapped the
    tenant's keys and shredded the copies under the previous master key (after which a
    process that knows only that key cannot use them) said "deleted nothing" (found by
    review)."""
    codes = {issue.code for issue in plan.issues_before}
    steps = []
    if REWRAP_CODE in codes:
        steps.append(
            "re-wrap the tenant's key versions wrapped by a previous master key under the "
            f"current one{f' ({master_key_id})' if master_key_id else ''}, and shred the "
            "old copies: processes that know only the previous master key can no longer "
            "use them"
        )
    stray = sorted(
        {
            issue.key_version
            for issue in plan.issues_before
            if issue.repair_action == DELETE_MATERIAL and issue.key_version is not None
        }
    )
    if stray:
        steps.append(f"delete stray key material of version(s) {', '.join(map(str, stray))}")
    retired = sum(issue.code == "secret_on_retired_key" for issue in plan.issues_before)
    if retired:
        steps.append(f"re-encrypt {retired} secret(s) on retired key versions onto the active one")
    return steps  # (and catching up the audit model, which changes no fact)


def emit_plan(plan: RepairResult, master_key_id: str | None = None) -> None:
    """The dry run: the issues found, what the repair would delete, and its other steps."""
    if plan.issues_before:
        emit_table(ISSUE_HEADERS, [issue_row(issue) for issue in plan.issues_before])
    click.echo(f"Tenant {plan.tenant_id!r}: {counts(plan.issues_before)}.")
    if deletes(plan):
        click.echo(f"The repair would delete {deletion_plan(plan)}.")
    else:
        click.echo("The repair would delete nothing.")
    for step in other_steps(plan, master_key_id):
        click.echo(f"It would also {step}.")


@drift_group.command("repair")
@click.argument("tenant_id", metavar="TENANT")
@click.option("--dry-run", is_flag=True, help="Only show what the repair would do.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting unrecoverable data.")
@json_option
@pass_cli
def repair(cli: CliContext, tenant_id: str, dry_run: bool, yes: bool) -> None:
    """Repair the drift of TENANT; asks before deleting or re-wrapping (unless --yes).

    Shows the plan first. Deletes only secrets whose values are unrecoverable and key
    versions that cannot be used; a repair that neither deletes nor re-wraps keys asks
    nothing. Every repair is audited. Before confirming a deletion because of a master
    key, check the diagnosis: adding a missing master key to
    KEYLEDGER_PREVIOUS_MASTER_KEYS recovers every value.
    Exits 1 when errors remain after the repair.
    """
    service = cli.service
    cli.refuse_unknown_tenant(tenant_id)  # (a mistyped tenant "repaired": found by review)
    plan = service.repair_tenant_secret_key_drift(tenant_id, dry_run=True, **cli.actor)
    master_key_id = service.master_key_id() if rewraps(plan) else None
    if dry_run:
        if cli.json_output:
            emit_json(to_data(plan))
        else:
            emit_plan(plan, master_key_id)
        return
    if not cli.json_output:
        emit_plan(plan, master_key_id)
    confirm = deletes(plan)
    if confirm:
        ask(
            f"Delete {deletion_plan(plan)} of tenant {tenant_id!r}? This cannot be undone.",
            yes=yes,
        )
    elif rewraps(plan):  # (as `master-key rewrap` asks: the shred cannot be undone)
        ask(
            f"Re-wrap the key versions of tenant {tenant_id!r} under master key "
            f"{master_key_id} and shred the copies under the previous one?",
            yes=yes,
        )
    # What was shown and confirmed bounds what is deleted: the repair diagnoses again,
    # and refuses if the tenant changed meanwhile so that it would delete more.
    result, incomplete = despite_shred(
        lambda: service.repair_tenant_secret_key_drift(
            tenant_id, confirm_delete_unrecoverable_data=confirm, confirmed_plan=plan, **cli.actor
        )
    )
    if cli.json_output:
        emit_json(to_data(result))
    else:
        emit_repair(result)
        for step in other_steps(plan, master_key_id):
            click.echo(f"Also: {step} (done).")
    if incomplete is not None:
        raise incomplete
    remaining = errors_in(result.remaining_issues)
    if remaining:
        raise click.ClickException(
            f"{remaining} drift error(s) remain in tenant {tenant_id!r}; "
            f"see `keyledger drift diagnose {shell_word(tenant_id)}`"
        )


def emit_repair(result: RepairResult) -> None:
    """What the repair deleted and the issues that remain."""
    if result.deleted_secrets or result.deleted_tenant_encryption_keys:
        secrets = what(result.deleted_secrets, "secret(s)", result.secret_names)
        versions = what(
            result.deleted_tenant_encryption_keys, "key version(s)", result.key_versions
        )
        click.echo(
            f"Repaired tenant {result.tenant_id!r}: deleted {secrets}, destroyed {versions}."
        )
    else:
        click.echo(f"Repaired tenant {result.tenant_id!r}: deleted nothing.")
    if result.remaining_issues:
        click.echo("Remaining issues:")
        emit_table(ISSUE_HEADERS, [issue_row(issue) for issue in result.remaining_issues])
    else:
        click.echo("No issues remain.")
