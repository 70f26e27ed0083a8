"""``keyledger secrets``: store, read, list, disable, enable and delete a tenant's secrets."""

from __future__ import annotations

import sys
from datetime import datetime

import click

from keyledger.cli.confirm import confirm
from keyledger.cli.errors import KeyledgerSubgroup
from keyledger.cli.params import AWARE_DATETIME, KEY_VALUE, metadata_from_pairs
from keyledger.cli.render import (
    emit_json,
    emit_table,
    is_terminal,
    json_option,
    secret_data,
    text,
    timestamp,
    to_data,
)
from keyledger.cli.root import CliContext, pass_cli
from keyledger.context import make_actor
from keyledger.errors import InvalidInput
from keyledger.models import SecretInfo
from keyledger.service import StatusFilter
from keyledger.validation import check_identifier, check_label, check_metadata, check_optional_text

tenant_argument = click.argument("tenant_id", metavar="TENANT")
name_argument = click.argument("name")


@click.group("secrets", cls=KeyledgerSubgroup)
def secrets_group() -> None:
    """Store, read, list and change a tenant's secrets."""


def read_value(binary: bool, limit: int, *, allow_empty: bool = False) -> str | bytes:
    """The value from stdin (a pipe) or a hidden, confirmed prompt; never from argv.
    At most ``limit`` bytes are taken from a pipe: a longer value is refused after
    reading one byte more, not after reading all of it. Nothing on stdin (a cron job's
    /dev/null, say) is refused unless ``allow_empty``: it would replace the value with
    an empty one (found by review)."""
    if sys.stdin is None:
        raise click.ClickException(
            "no value to store: standard input is closed; pipe the value in, or run the "
            "command on a terminal to be asked for it"
        )
    if is_terminal("stdin"):
        if binary:
            raise click.UsageError("--binary reads the value from stdin: pipe or redirect it in")
        value: str = click.prompt("Value", hide_input=True, confirmation_prompt=True, err=True)
        return value
    # Enough for a value at the limit plus the line ending dropped below; one byte more
    # proves the value too large (the service checks the exact size of the rest).
    raw = sys.stdin.buffer.read(limit + 3)
    if len(raw) > limit + 2:
        raise InvalidInput(f"value is larger than the limit of {limit} bytes")
    if not raw and not allow_empty:
        raise click.ClickException(
            "no value to store: standard input is empty; pipe the value in, or add "
            "--allow-empty to store an empty value"
        )
    if binary:
        return raw
    decoded = _utf8_text(raw)
    if decoded is None:  # (raised outside the handler: its error holds the whole value)
        raise click.UsageError("stdin is not UTF-8 text: use --binary to store bytes")
    # `echo value | keyledger secrets put ...` means "value": drop the one line ending echo adds.
    for ending in ("\r\n", "\n"):
        if decoded.endswith(ending):
            return decoded[: -len(ending)]
    return decoded


def _utf8_text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# Words after NAME, and unknown options, are taken rather than refused by click (whose
# message would repeat them: a value typed there would land in CI logs too), and refused
# below without repeating them.
@secrets_group.command(
    "put", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
@tenant_argument
@name_argument
@click.option("--category", help="Category (kept from the previous version when left out).")
@click.option("--description", help="Description (kept when left out).")
@click.option(
    "--expires-at", type=AWARE_DATETIME, help="ISO 8601 with a timezone, e.g. 2027-01-01T00:00:00Z."
)
@click.option("--clear-expiry", is_flag=True, help="Remove an existing expiry.")
@click.option(
    "--metadata",
    type=KEY_VALUE,
    multiple=True,
    metavar="KEY=VALUE",
    help="Metadata entry (repeatable); given entries replace the old metadata.",
)
@click.option("--binary", is_flag=True, help="Store the bytes read from stdin as they are.")
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Store an empty value when stdin is empty (refused without this flag).",
)
@json_option
@pass_cli
def put(
    cli: CliContext,
    tenant_id: str,
    name: str,
    category: str | None,
    description: str | None,
    expires_at: datetime | None,
    clear_expiry: bool,
    metadata: tuple[tuple[str, str], ...],
    binary: bool,
    allow_empty: bool,
) -> None:
    """Create or update secret NAME of TENANT.

    The value is read from stdin when it is piped in (one trailing newline is dropped unless
    --binary), otherwise from a hidden prompt. It is never taken from the command line.
    Empty input is refused (a script's stdin may be empty by mistake); store an empty
    value with `printf '' | keyledger secrets put TENANT NAME --allow-empty`.
    """
    if click.get_current_context().args:
        raise click.UsageError(
            "secrets put takes no value on the command line, and no option but those of "
            "--help (what was given is not repeated here): pipe the value to stdin, or "
            "answer the hidden prompt"
        )
    if expires_at is not None and clear_expiry:
        raise click.UsageError("give --expires-at or --clear-expiry, not both")
    entries = metadata_from_pairs(metadata)
    check_identifier("tenant_id", tenant_id)
    check_identifier("name", name)
    # Checked before the value is asked for, so that nobody types a value twice in vain.
    check_label("category", category, 200)
    check_optional_text("description", description)
    check_metadata(entries)
    service = cli.service
    value = read_value(binary, service.max_value_bytes, allow_empty=allow_empty)
    info = service.store_for_tenant(
        tenant_id,
        name,
        value,
        category=category,
        description=description,
        expires_at=expires_at,
        clear_expiry=clear_expiry,
        metadata=entries,
        **cli.actor,
    )
    if cli.json_output:  # (the tenant too, as the status changes say it)
        emit_json({"tenant_id": tenant_id, **to_data(info)})
    else:
        click.echo(
            f"Stored secret {name!r} in tenant {tenant_id!r} "
            f"(version {info.version}, key version {info.key_version})."
        )


@secrets_group.command("get")
@tenant_argument
@name_argument
@json_option
@pass_cli
def get(cli: CliContext, tenant_id: str, name: str) -> None:
    """Print the value of secret NAME of TENANT, exactly as stored.

    A newline is added only when stdout is a terminal. The read is audited.
    """
    secret = cli.service.retrieve_for_tenant(tenant_id, name, **cli.actor)
    if cli.json_output:
        emit_json(secret_data(secret))
    elif isinstance(secret.value, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(secret.value)
        sys.stdout.buffer.flush()
    else:
        click.echo(secret.value, nl=is_terminal("stdout"))


STATUS_FILTERS: dict[str, StatusFilter] = {
    "active": "active",
    "disabled": "disabled",
    "expired": "expired",
    "all": None,
}
LIST_HEADERS = ("NAME", "STATUS", "CATEGORY", "VERSION", "KEY", "EXPIRES", "READS", "UPDATED")


def list_row(info: SecretInfo) -> tuple[str, ...]:
    """One row of the secrets table."""
    return (
        info.name,
        info.status,
        text(info.category),
        str(info.version),
        str(info.key_version),
        timestamp(info.expires_at),
        str(info.access_count),
        timestamp(info.updated_at),
    )


@secrets_group.command("list")
@tenant_argument
@click.option("--category", help="Only this category.")
@click.option(
    "--status",
    type=click.Choice(list(STATUS_FILTERS)),
    default="active",
    show_default=True,
    help="'all' includes expired secrets.",
)
@click.option("--include-expired", is_flag=True, help="Add expired secrets to the listing.")
@click.option("--limit", type=click.IntRange(min=0), help="At most this many.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--after",
    "after_name",
    metavar="NAME",
    help="Only names after NAME: the last name of a page gives the next, which does not "
    "shift as secrets are stored or deleted (--offset pages do).",
)
@json_option
@pass_cli
def list_secrets(
    cli: CliContext,
    tenant_id: str,
    category: str | None,
    status: str,
    include_expired: bool,
    limit: int | None,
    offset: int,
    after_name: str | None,
) -> None:
    """List the secrets of TENANT by name (never their values)."""
    infos = cli.service.list_for_tenant(
        tenant_id,
        category=category,
        status=STATUS_FILTERS[status],
        include_expired=include_expired or status == "all",
        limit=limit,
        offset=offset,
        after_name=after_name,
    )
    if cli.json_output:
        emit_json([to_data(info) for info in infos])
    else:
        emit_table(LIST_HEADERS, [list_row(info) for info in infos])


def change(cli: CliContext, tenant_id: str, name: str, action: str, done: str) -> None:
    """Disable, enable or delete; a missing secret is an error (exit 1)."""
    actor = make_actor(**cli.actor)
    if not cli.service.change_for_tenant(tenant_id, name, action, actor):
        raise click.ClickException(f"no secret {name!r} in tenant {tenant_id!r}")
    if cli.json_output:
        emit_json({"tenant_id": tenant_id, "name": name, "action": action, "changed": True})
    else:
        click.echo(f"{done} secret {name!r} in tenant {tenant_id!r}.")


@secrets_group.command("disable")
@tenant_argument
@name_argument
@json_option
@pass_cli
def disable(cli: CliContext, tenant_id: str, name: str) -> None:
    """Disable secret NAME of TENANT: reads are refused until it is enabled."""
    change(cli, tenant_id, name, "disable", "Disabled")


@secrets_group.command("enable")
@tenant_argument
@name_argument
@json_option
@pass_cli
def enable(cli: CliContext, tenant_id: str, name: str) -> None:
    """Enable secret NAME of TENANT (an expired secret stays expired)."""
    change(cli, tenant_id, name, "enable", "Enabled")


@secrets_group.command("delete")
@tenant_argument
@name_argument
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_cli
def delete(cli: CliContext, tenant_id: str, name: str, yes: bool) -> None:
    """Delete secret NAME of TENANT from every listing and read."""
    check_identifier("tenant_id", tenant_id)
    check_identifier("name", name)
    with cli.scope(tenant_id):  # (nothing to confirm for a secret that is not there: the
        there = cli.service.exists(name)  # delete below is refused, and audited)
    if there:
        confirm(f"Delete secret {name!r} of tenant {tenant_id!r}?", yes=yes)
    change(cli, tenant_id, name, "delete", "Deleted")
