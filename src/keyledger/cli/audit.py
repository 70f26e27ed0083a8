"""``keyledger audit``: query the audit stream of a tenant, or of every tenant.

``log`` and ``trail`` are here; the evidence commands (replay, export, seal, anchor,
verify) are attached to the same group in ``audit_evidence``.
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from typing import get_args

import click

from keyledger.application.export import csv_cell
from keyledger.cli.errors import KeyledgerSubgroup
from keyledger.cli.keys import one_target
from keyledger.cli.params import AWARE_DATETIME
from keyledger.cli.render import (
    emit_json,
    emit_json_pages,
    emit_table,
    emit_table_pages,
    json_option,
    text,
    timestamp,
    to_data,
)
from keyledger.cli.root import CliContext, pass_cli
from keyledger.context import super_admin
from keyledger.investigation import EXPORT_FIELDS
from keyledger.models import AUDIT_ACTIONS, AuditEntry, AuditResult
from keyledger.validation import MAX_COUNT

AUDIT_HEADERS = ("POSITION", "TIME", "ACTION", "RESULT", "SECRET", "KEY", "USER", "IP", "DETAILS")
# The export schema's fields that an audit entry has (the rest name the stored event).
LOG_CSV_FIELDS = EXPORT_FIELDS[: EXPORT_FIELDS.index("details") + 1]
TRAIL_HEADERS = (
    *("POSITION", "TIME", "ACTION", "RESULT", "VERSION", "KEY", "USER", "IP", "USER-AGENT"),
    "DETAILS",
)


@click.group("audit", cls=KeyledgerSubgroup)
def audit_group() -> None:
    """Query the audit stream; replay, export, seal and verify it."""


def details_text(entry: AuditEntry) -> str:
    """An entry's details as compact JSON text, empty when there are none."""
    return json.dumps(entry.details, sort_keys=True, default=str) if entry.details else ""


def audit_row(entry: AuditEntry) -> tuple[str, ...]:
    """One row of the audit table."""
    return (
        str(entry.position),
        timestamp(entry.timestamp),
        entry.action,
        entry.result,
        text(entry.secret_name),
        text(entry.key_version),
        entry.user_id,
        text(entry.ip_address),
        text(details_text(entry)),
    )


def emit_csv(entries: list[AuditEntry]) -> None:
    """The entries as CSV with a header row on stdout; details as JSON text."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(LOG_CSV_FIELDS)
    for entry in entries:
        row = entry.model_dump() | {
            "timestamp": entry.timestamp.isoformat(),
            "details": json.dumps(entry.details, sort_keys=True, default=str),
        }
        writer.writerow([csv_cell(row[field]) for field in LOG_CSV_FIELDS])


@audit_group.command("log")
@click.argument("tenant_id", metavar="[TENANT]", required=False)
@click.option("--all-tenants", is_flag=True, help="Every tenant's entries (instead of TENANT).")
@click.option("--secret", "secret_name", help="Only entries about this secret.")
@click.option("--action", type=click.Choice(AUDIT_ACTIONS), help="Only this action.")
@click.option("--result", type=click.Choice(get_args(AuditResult)), help="Only this result.")
@click.option("--user-id", help="Only entries by this user.")
@click.option("--since", type=AWARE_DATETIME, help="From this time (inclusive), ISO 8601.")
@click.option("--until", type=AWARE_DATETIME, help="Before this time (exclusive), ISO 8601.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--before-position",
    type=click.IntRange(min=0),
    help="Only entries before this stream position: the last POSITION of a page gives "
    "the next page, which does not shift as entries are added (--offset pages do).",
)
@click.option("--csv", "csv_output", is_flag=True, help="CSV with a header row (not with --json).")
@json_option
@pass_cli
def log(
    cli: CliContext,
    tenant_id: str | None,
    all_tenants: bool,
    secret_name: str | None,
    action: str | None,
    result: str | None,
    user_id: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
    before_position: int | None,
    csv_output: bool,
) -> None:
    """Show the audit entries of TENANT, or of every tenant, newest first."""
    one_target(tenant_id, all_tenants, "--all-tenants")
    if csv_output and cli.json_output:
        raise click.UsageError("--json and --csv are mutually exclusive")
    scope: AbstractContextManager[object] = (
        super_admin() if tenant_id is None else cli.scope(tenant_id)
    )
    with scope:
        entries = cli.service.get_audit_logs(
            secret_name=secret_name,
            action=action,
            result=result,
            user_id=user_id,
            since=since,
            until=until,
            limit=limit + 1 if 0 < limit < MAX_COUNT else limit,  # one more: any older?
            offset=offset,
            before_position=before_position,
        )
    if not entries and tenant_id is not None:
        cli.refuse_unknown_tenant(tenant_id)  # (nothing found: a mistyped tenant?)
    if limit and len(entries) > limit:
        # A page cut at --limit used to look like the whole answer, and it is the oldest
        # entries, the start of an incident, that it leaves out (found by review).
        entries = entries[:limit]
        without = " (without --offset)" if offset else ""  # (with it, it would skip some)
        click.echo(
            f"More entries match: --before-position {entries[-1].position}{without} shows "
            "the next, older page.",
            err=True,
        )
    if csv_output:
        emit_csv(entries)
    elif cli.json_output:
        emit_json([to_data(entry) for entry in entries])
    elif tenant_id is None:
        emit_table(("TENANT", *AUDIT_HEADERS), [(e.tenant_id, *audit_row(e)) for e in entries])
    else:
        emit_table(AUDIT_HEADERS, [audit_row(entry) for entry in entries])


def trail_row(entry: AuditEntry) -> tuple[str, ...]:
    """One row of a secret's trail: re-encryptions are marked in ACTION."""
    action = entry.action
    if entry.details.get("reencrypted"):
        action += " (re-encrypt)"
    return (
        str(entry.position),
        timestamp(entry.timestamp),
        action,
        entry.result,
        text(entry.details.get("version")),
        text(entry.key_version),
        entry.user_id,
        text(entry.ip_address),
        text(entry.user_agent),
        text(details_text(entry)),
    )


@audit_group.command("trail")
@click.argument("tenant_id", metavar="TENANT")
@click.argument("name")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    help="At most this many entries (default: the whole history).",
)
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, help="Skip this many oldest entries."
)
@json_option
@pass_cli
def trail(cli: CliContext, tenant_id: str, name: str, limit: int | None, offset: int) -> None:
    """Show the whole history of secret NAME of TENANT, oldest first.

    Every version stored, read, denial, failure, status change, re-encryption (marked
    "(re-encrypt)") and the deletion, with who did it from where. VERSION is the secret's
    version the entry is about, KEY the key version. A secret read often has a long
    history: it is read and written 1,000 entries at a time, so memory stays flat
    whatever its length; --limit and --offset choose a part of it.
    """
    with cli.scope(tenant_id):
        pages = trail_pages(cli, name, limit, offset)
        first = next(pages, [])
        paged = bool(offset) or limit == 0  # (an empty page: has the secret any entry?)
        if not first and (not paged or not cli.service.audit_trail(name, limit=1)):
            raise click.ClickException(
                f"no audit entries for secret {name!r} of tenant {tenant_id!r}"
            )
        chained = itertools.chain([first], pages)
        if cli.json_output:
            emit_json_pages([to_data(entry) for entry in page] for page in chained)
        else:
            emit_table_pages(TRAIL_HEADERS, ([trail_row(e) for e in page] for page in chained))


TRAIL_PAGE = 1000  # entries of a trail read (and held) at a time


def trail_pages(
    cli: CliContext, name: str, limit: int | None, offset: int
) -> Iterator[list[AuditEntry]]:
    """The chosen part of the trail, in pages read by position (each after the last)."""
    left = limit
    after: int | None = None
    while left is None or left > 0:
        size = TRAIL_PAGE if left is None else min(left, TRAIL_PAGE)
        page = cli.service.audit_trail(
            name, limit=size, offset=offset if after is None else 0, after_position=after
        )
        if not page:
            return
        yield page
        if len(page) < size:
            return
        after = page[-1].position
        left = None if left is None else left - len(page)
