"""``keyledger keys``: rotate, re-encrypt and list a tenant's data key versions."""

from __future__ import annotations

import sys

import click

from keyledger.cli.render import (
    emit_json,
    emit_table,
    is_terminal,
    json_option,
    text,
    timestamp,
    to_data,
)
from keyledger.cli.root import CliContext, pass_cli
from keyledger.models import ReencryptResult, TenantKeyInfo

tenant_argument = click.argument("tenant_id", metavar="TENANT")


@click.group("keys")
def keys_group() -> None:
    """Rotate, re-encrypt and list a tenant's data encryption keys."""


@keys_group.command("rotate")
@tenant_argument
@json_option
@pass_cli
def rotate(cli: CliContext, tenant_id: str) -> None:
    """Make a new key version of TENANT active and retire the previous one.

    Secrets stay on their key version until `keyledger keys reencrypt TENANT`.
    """
    with cli.scope(tenant_id):
        info = cli.service.rotate_key()
    if cli.json_output:
        emit_json(to_data(info))
    else:
        click.echo(f"Key version {info.version} is now active for tenant {tenant_id!r}.")


def reencrypt_with_progress(cli: CliContext, tenant_id: str) -> ReencryptResult:
    """Re-encrypt inside the CLI's tenant scope, with a progress bar on a terminal."""
    with cli.scope(tenant_id):
        if not is_terminal("stderr"):
            return cli.service.reencrypt_all()
        total = cli.service.count_live_secrets(tenant_id)
        with click.progressbar(length=total, label="Re-encrypting", file=sys.stderr) as bar:
            return cli.service.reencrypt_all(progress=bar.update)


@keys_group.command("reencrypt")
@tenant_argument
@json_option
@pass_cli
def reencrypt(cli: CliContext, tenant_id: str) -> None:
    """Move every live secret of TENANT onto its active key version.

    Safe to interrupt and rerun. Exits 1 when some secrets could not be re-encrypted.
    """
    result = reencrypt_with_progress(cli, tenant_id)
    if cli.json_output:
        emit_json(to_data(result))
    else:
        click.echo(
            f"Re-encrypted tenant {tenant_id!r}: {result.success} on the active key, "
            f"{result.failed} failed."
        )
    if result.failed:
        raise click.ClickException(
            f"{result.failed} secret(s) of tenant {tenant_id!r} could not be re-encrypted; "
            f"see `keyledger audit log {tenant_id} --action update --result failure`"
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
@tenant_argument
@json_option
@pass_cli
def list_keys(cli: CliContext, tenant_id: str) -> None:
    """List the key versions of TENANT (never key material)."""
    infos = cli.service.list_keys(tenant_id)
    if cli.json_output:
        emit_json([to_data(info) for info in infos])
    else:
        emit_table(KEY_HEADERS, [key_row(info) for info in infos])
