"""``keyledger audit``: query the audit stream of a tenant."""

from __future__ import annotations

import json
from datetime import datetime
from typing import get_args

import click

from keyledger.cli.params import AWARE_DATETIME
from keyledger.cli.render import emit_json, emit_table, json_option, text, timestamp, to_data
from keyledger.cli.root import CliContext, pass_cli
from keyledger.models import AuditEntry, AuditResult

AUDIT_ACTIONS = (
    *("create", "read", "update", "delete", "rotate_key", "disable", "enable", "expire"),
    *("create_key", "compromise_key", "destroy_key", "rewrap_key", "repair", "erase_tenant"),
)
AUDIT_HEADERS = ("POSITION", "TIME", "ACTION", "RESULT", "SECRET", "KEY", "USER", "IP", "DETAILS")


@click.group("audit")
def audit_group() -> None:
    """Query the audit stream."""


def audit_row(entry: AuditEntry) -> tuple[str, ...]:
    """One row of the audit table."""
    details = json.dumps(entry.details, sort_keys=True, default=str) if entry.details else ""
    return (
        str(entry.position),
        timestamp(entry.timestamp),
        entry.action,
        entry.result,
        text(entry.secret_name),
        text(entry.key_version),
        entry.user_id,
        text(entry.ip_address),
        text(details),
    )


@audit_group.command("log")
@click.argument("tenant_id", metavar="TENANT")
@click.option("--secret", "secret_name", help="Only entries about this secret.")
@click.option("--action", type=click.Choice(AUDIT_ACTIONS), help="Only this action.")
@click.option("--result", type=click.Choice(get_args(AuditResult)), help="Only this result.")
@click.option("--user-id", help="Only entries by this user.")
@click.option("--since", type=AWARE_DATETIME, help="From this time (inclusive), ISO 8601.")
@click.option("--until", type=AWARE_DATETIME, help="Before this time (exclusive), ISO 8601.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@json_option
@pass_cli
def log(
    cli: CliContext,
    tenant_id: str,
    secret_name: str | None,
    action: str | None,
    result: str | None,
    user_id: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> None:
    """Show the audit entries of TENANT, newest first."""
    with cli.scope(tenant_id):
        entries = cli.service.get_audit_logs(
            secret_name=secret_name,
            action=action,
            result=result,
            user_id=user_id,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
    if cli.json_output:
        emit_json([to_data(entry) for entry in entries])
    else:
        emit_table(AUDIT_HEADERS, [audit_row(entry) for entry in entries])
