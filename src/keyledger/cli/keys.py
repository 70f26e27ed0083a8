"""``keyledger keys``: the key lifecycle of tenants' data encryption keys.

Rotate (one tenant or every due one), re-encrypt, list, mark compromised, destroy old
retired versions, and show which versions the rotation policy says are due.
"""

from __future__ import annotations

import sys

import click

from keyledger.cli.confirm import confirm
from keyledger.cli.errors import KeyledgerSubgroup, despite_shred
from keyledger.cli.interrupts import both, resumable
from keyledger.cli.params import yes_option
from keyledger.cli.render import (
    emit_json,
    emit_table,
    is_terminal,
    json_option,
    shell_word,
    terminal_safe,
    text,
    timestamp,
    to_data,
)
from keyledger.cli.root import CliContext, pass_cli
from keyledger.context import super_admin
from keyledger.errors import InvalidInput, KeyledgerError
from keyledger.models import CleanupKeyOutcome, KeyDue, ReencryptResult, TenantKeyInfo
from keyledger.validation import check_optional_text

tenant_argument = click.argument("tenant_id", metavar="TENANT")
optional_tenant_argument = click.argument("tenant_id", metavar="[TENANT]", required=False)


@click.group("keys", cls=KeyledgerSubgroup)
def keys_group() -> None:
    """Rotate, re-encrypt, list, compromise and clean up tenants' data encryption keys."""


def one_target(tenant_id: str | None, flag: bool, flag_name: str) -> None:
    """Exactly one of TENANT and ``flag_name``, else a usage error."""
    if tenant_id is not None and flag:
        raise click.UsageError(f"give TENANT or {flag_name}, not both")
    if tenant_id is None and not flag:
        raise click.UsageError(f"give TENANT or {flag_name}")


@keys_group.command("rotate")
@optional_tenant_argument
@click.option("--due", is_flag=True, help="Rotate every tenant whose active key is due.")
@json_option
@pass_cli
def rotate(cli: CliContext, tenant_id: str | None, due: bool) -> None:
    """Make a new key version of TENANT active and retire the previous one.

    With --due instead of TENANT, rotate every tenant whose active key version is due
    (see `keyledger keys due`). Secrets stay on their key version until
    `keyledger keys reencrypt TENANT`.
    """
    one_target(tenant_id, due, "--due")
    if tenant_id is None:
        rotate_due(cli)
        return
    with cli.scope(tenant_id):
        info = cli.service.rotate_key()
    if cli.json_output:
        emit_json(to_data(info))
    else:
        click.echo(f"Key version {info.version} is now active for tenant {tenant_id!r}.")


def rotate_due(cli: CliContext) -> None:
    """Rotate every due tenant, recording this run's actor on each rotation.

    A tenant that cannot be rotated (its active version under a master key that is not
    configured, say) does not stop the others: each failure is one ``Error:`` line on
    stderr (and an entry of "failed" with --json), the rotations go on, and the command
    exits 1 at the end.
    """
    service = cli.service
    rotated: list[tuple[KeyDue, TenantKeyInfo]] = []
    failed: list[dict[str, str]] = []
    with super_admin():  # the inventory of every tenant: a cross-tenant read
        every_due = service.keys_due()
    with resumable("the rotation of due keys", "tenants") as done:
        for due in every_due:
            try:
                info = service.rotate_due_key(due, **cli.actor)
            except KeyledgerError as error:  # its failure is audited; the next tenant's turn
                failed.append({"tenant_id": due.tenant_id, "error": str(error)})
                click.echo(f"Error: {terminal_safe(str(error))}", err=True)
                continue
            done(1)
            if info is not None:  # (None: another run rotated it first)
                rotated.append((due, info))
                if not cli.json_output:  # as it happens: a run stopped by Ctrl-C has
                    click.echo(  # listed what it rotated (it listed nothing)
                        f"Key version {info.version} is now active for tenant "
                        f"{info.tenant_id!r} (version {due.version} was "
                        f"{', '.join(due.reasons)})."
                    )
    if cli.json_output:  # (the failures too: a script reads them here, not on stderr)
        emit_json({"rotated": [to_data(info) for _, info in rotated], "failed": failed})
    elif not rotated and not failed:
        click.echo("No key version is due for rotation.")
    if failed:
        raise click.exceptions.Exit(1)


def reencrypt_with_progress(cli: CliContext, tenant_id: str) -> ReencryptResult:
    """Re-encrypt inside the CLI's tenant scope, with a progress bar on a terminal."""
    with cli.scope(tenant_id), resumable("the re-encryption", "secrets") as done:
        if not is_terminal("stderr"):
            return cli.service.reencrypt_all(progress=done)
        total = cli.service.count_live_secrets(tenant_id)
        with click.progressbar(length=total, label="Re-encrypting", file=sys.stderr) as bar:
            return cli.service.reencrypt_all(progress=both(bar.update, done))


@keys_group.command("reencrypt")
@tenant_argument
@json_option
@pass_cli
def reencrypt(cli: CliContext, tenant_id: str) -> None:
    """Move every live secret of TENANT onto its active key version.

    Safe to interrupt and rerun. Exits 1 when some secrets could not be re-encrypted.
    """
    cli.refuse_unknown_tenant(tenant_id)
    result = reencrypt_with_progress(cli, tenant_id)
    if cli.json_output:
        emit_json({"tenant_id": tenant_id, **to_data(result)})
    else:
        click.echo(
            f"Re-encrypted tenant {tenant_id!r}: {result.success} on the active key, "
            f"{result.failed} failed."
        )
    if result.failed:
        raise click.ClickException(
            f"{result.failed} secret(s) of tenant {tenant_id!r} could not be re-encrypted; "
            f"see `keyledger audit log {shell_word(tenant_id)} --action update --result failure`"
        )


KEY_HEADERS = ("VERSION", "STATUS", "AMK", "CREATED", "RETIRED", "SECRETS")


def key_row(info: TenantKeyInfo) -> tuple[str, ...]:
    """One row of the keys table."""
    return (
        str(info.version),
        info.status,
        text(info.amk_id),
        timestamp(info.created_at),
        timestamp(info.retired_at),
        str(info.secret_count),
    )


@keys_group.command("list")
@optional_tenant_argument
@click.option("--all-tenants", is_flag=True, help="Every tenant's key versions.")
@json_option
@pass_cli
def list_keys(cli: CliContext, tenant_id: str | None, all_tenants: bool) -> None:
    """List the key versions of TENANT, or of every tenant (never key material).

    SECRETS is how many live secrets each version still encrypts.
    """
    one_target(tenant_id, all_tenants, "--all-tenants")
    if tenant_id is None:
        with super_admin():
            infos = cli.service.list_keys()
    else:
        infos = cli.service.list_keys(tenant_id)
        if not infos:
            cli.refuse_unknown_tenant(tenant_id)
    if cli.json_output:
        emit_json([to_data(info) for info in infos])
    elif tenant_id is None:
        emit_table(("TENANT", *KEY_HEADERS), [(i.tenant_id, *key_row(i)) for i in infos])
    else:
        emit_table(KEY_HEADERS, [key_row(info) for info in infos])


def active_version(cli: CliContext, tenant_id: str) -> int | None:
    """The tenant's active key version, if it has one."""
    infos = cli.service.list_keys(tenant_id)
    return next((info.version for info in infos if info.status == "active"), None)


@keys_group.command("compromise")
@tenant_argument
@click.argument("version", type=click.IntRange(min=1))
@click.option("--reason", required=True, help="Why the version is compromised (audited).")
@yes_option
@json_option
@pass_cli
def compromise(cli: CliContext, tenant_id: str, version: int, reason: str, yes: bool) -> None:
    """Mark key VERSION of TENANT compromised: it is never used again.

    A compromised active version is replaced by a fresh active version in the same step.
    Secrets still under VERSION cannot be read until their values are stored afresh
    (`keyledger drift diagnose TENANT` lists them).
    """
    if not (check_optional_text("reason", reason) or "").strip():  # (checked before it asks)
        raise InvalidInput("a compromise needs a reason")
    if not cli.service.list_keys(tenant_id):  # (a mistyped tenant: nothing to confirm)
        raise click.ClickException(f"tenant {tenant_id!r} has no keys")
    confirm(
        f"Mark key version {version} of tenant {tenant_id!r} as compromised? "
        "Secrets under it cannot be read until they are stored afresh.",
        yes=yes,
    )
    info = cli.service.compromise_key_for_tenant(tenant_id, version, reason, **cli.actor)
    active = active_version(cli, tenant_id)
    if cli.json_output:
        emit_json(to_data(info) | {"active_version": active})
        return
    click.echo(f"Key version {version} of tenant {tenant_id!r} is {info.status}.")
    if active is not None:
        click.echo(f"Key version {active} is active.")
    if info.secret_count:
        click.echo(
            f"{info.secret_count} secret(s) are still under it and cannot be read: store "
            f"their values afresh (`keyledger drift diagnose {shell_word(tenant_id)}` lists them)."
        )


CLEANUP_HEADERS = ("TENANT", "VERSION", "OUTCOME", "REASON")


def cleanup_row(outcome: CleanupKeyOutcome) -> tuple[str, ...]:
    """One row of the cleanup table."""
    return (outcome.tenant_id, str(outcome.version), outcome.outcome, text(outcome.reason))


@keys_group.command("cleanup-retired")
@click.option(
    "--older-than-days",
    type=click.IntRange(min=0),
    default=90,
    show_default=True,
    help="Only versions retired (or compromised) at least this many days ago.",
)
@yes_option
@json_option
@pass_cli
def cleanup_retired(cli: CliContext, older_than_days: int, yes: bool) -> None:
    """Destroy the key material of old retired and compromised versions, in all tenants.

    Versions that live secrets still use are skipped and reported: run
    `keyledger keys reencrypt TENANT` first (secrets on a compromised version need new
    values: store them again). `--older-than-days 0` destroys a compromised version at
    once. Safe to interrupt and rerun.
    """
    confirm(
        f"Destroy the key material of every key version retired or compromised "
        f"{older_than_days} or more days ago, in every tenant? Versions still in use are "
        "skipped.",
        yes=yes,
    )
    with resumable("the cleanup", "key versions") as done:
        result, incomplete = despite_shred(
            lambda: cli.service.cleanup_retired_keys(older_than_days, **cli.actor, progress=done)
        )
    if cli.json_output:
        emit_json(to_data(result))
    else:
        if result.keys:
            emit_table(CLEANUP_HEADERS, [cleanup_row(outcome) for outcome in result.keys])
        click.echo(
            f"Destroyed {result.destroyed} retired or compromised key version(s), "
            f"skipped {result.skipped} still in use."
        )
    if incomplete is not None:
        raise incomplete


DUE_HEADERS = ("TENANT", "VERSION", "CREATED", "AGE DAYS", "ENCRYPTIONS", "REASONS")


def due_row(due: KeyDue) -> tuple[str, ...]:
    """One row of the due table."""
    return (
        due.tenant_id,
        str(due.version),
        timestamp(due.created_at),
        f"{due.age_days:.1f}",
        str(due.encryptions),
        "; ".join(due.reasons),
    )


@keys_group.command("due")
@json_option
@pass_cli
def due(cli: CliContext) -> None:
    """List the active key versions due for rotation, in every tenant.

    A version is due after KEYLEDGER_KEY_MAX_AGE_DAYS (default 90) days or
    KEYLEDGER_KEY_MAX_ENCRYPTIONS (default 2^30) encryptions; `keyledger keys rotate --due`
    rotates them.
    """
    with super_admin():  # a cross-tenant read
        keys = cli.service.keys_due()
    if cli.json_output:
        emit_json([to_data(key) for key in keys])
    else:
        emit_table(DUE_HEADERS, [due_row(key) for key in keys])
