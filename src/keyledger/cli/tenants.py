"""``keyledger tenants``: operations on a whole tenant (crypto-shredding)."""

from __future__ import annotations

import click

from keyledger.cli.confirm import confirm
from keyledger.cli.errors import KeyledgerSubgroup, despite_shred
from keyledger.cli.render import emit_json, json_option
from keyledger.cli.root import CliContext, pass_cli


@click.group("tenants", cls=KeyledgerSubgroup)
def tenants_group() -> None:
    """Operations on a whole tenant."""


@tenants_group.command("erase")
@click.argument("tenant_id", metavar="TENANT")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_cli
def erase(cli: CliContext, tenant_id: str, yes: bool) -> None:
    """Destroy every key version of TENANT: every value it ever stored becomes unrecoverable.

    The key material is deleted from the store (and shredded: SQLite overwrites it and
    checkpoints the WAL, PostgreSQL vacuums the key-material table); the events and the
    audit stream stay complete. This cannot be undone. Safe to interrupt and rerun.
    """
    if not cli.service.list_keys(tenant_id):  # (a mistyped tenant: nothing to confirm)
        raise click.ClickException(f"tenant {tenant_id!r} has no keys")
    confirm(
        f"Erase tenant {tenant_id!r}? Every value it ever stored becomes unrecoverable; "
        "this cannot be undone.",
        yes=yes,
    )
    versions, incomplete = despite_shred(
        lambda: cli.service.erase_tenant(tenant_id, confirm=True, **cli.actor)
    )
    if cli.json_output:
        emit_json({"tenant_id": tenant_id, "destroyed_key_versions": versions})
    elif versions:
        click.echo(
            f"Erased tenant {tenant_id!r}: destroyed key version(s) "
            f"{', '.join(map(str, versions))}. Its values are unrecoverable; "
            "its audit stream is kept."
        )
    else:
        click.echo(f"Tenant {tenant_id!r} has no key version left to destroy.")
    if incomplete is not None:
        raise incomplete
