"""``keyledger audit replay|export``: a tenant as it was, and the log for other tools.

Attached to the ``audit`` group of ``keyledger.cli.audit``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from datetime import datetime
from typing import IO, Any

import click

from keyledger.cli.audit import audit_group
from keyledger.cli.params import AWARE_DATETIME
from keyledger.cli.projections import stop_on_signals
from keyledger.cli.render import (
    emit_json,
    emit_table,
    is_terminal,
    json_option,
    shown,
    text,
    timestamp,
    to_data,
)
from keyledger.cli.root import CliContext, pass_cli
from keyledger.context import super_admin
from keyledger.investigation import write_csv, write_jsonl
from keyledger.models import (
    KeyVersionAsOf,
    SecretInfo,
    TenantState,
)

SECRET_HEADERS = (
    *("NAME", "STATUS", "VERSION", "KEY", "CATEGORY", "ACCESSES", "LAST-ACCESS", "EXPIRES"),
    "UPDATED",
)
KEY_HEADERS = ("VERSION", "STATUS", "KEY-ID", "AMK", "CREATED", "RETIRED")
INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


output_option = click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Write to FILE instead of stdout.",
)


# -- replay -------------------------------------------------------------------------------


def secret_row(secret: SecretInfo) -> tuple[str, ...]:
    """One row of the replayed secrets table (never a value)."""
    return (
        secret.name,
        secret.status,
        str(secret.version),
        str(secret.key_version),
        text(secret.category),
        str(secret.access_count),
        timestamp(secret.last_accessed_at),
        timestamp(secret.expires_at),
        timestamp(secret.updated_at),
    )


def key_row(key: KeyVersionAsOf) -> tuple[str, ...]:
    """One row of the replayed key versions table (never key material)."""
    return (
        str(key.version),
        key.status,
        key.key_id,
        key.amk_id,
        timestamp(key.created_at),
        timestamp(key.retired_at),
    )


def state_heading(state: TenantState) -> str:
    """``Tenant T as of <time or position> (position P, N events)``."""
    when = timestamp(state.as_of) if state.as_of else f"position {state.as_of_position}"
    return (
        f"Tenant {shown(state.tenant_id)} as of {when} "
        f"(position {state.position}, {state.events_applied} events)"
    )


@audit_group.command("replay")
@click.argument("tenant_id", metavar="TENANT")
@click.option("--as-of", "at", type=AWARE_DATETIME, help="The state at this time, ISO 8601.")
@click.option(
    "--position",
    type=click.IntRange(min=0),
    metavar="POSITION",
    help="The state after this stream position.",
)
@json_option
@pass_cli
def replay(cli: CliContext, tenant_id: str, at: datetime | None, position: int | None) -> None:
    """Show TENANT's secrets and key versions as they were at a time or stream position.

    Give exactly one of --as-of and --position. The state is replayed from the event stream
    alone (no read model); secret values and key material are never shown.
    """
    if (at is None) == (position is None):
        raise click.UsageError("give exactly one of --as-of and --position")
    cli.refuse_unknown_tenant(tenant_id)
    state = cli.service.state_as_of(tenant_id, at=at, position=position)
    if cli.json_output:
        emit_json(to_data(state))
        return
    click.echo(state_heading(state))
    click.echo()
    emit_table(SECRET_HEADERS, [secret_row(secret) for secret in state.secrets])
    click.echo()
    emit_table(KEY_HEADERS, [key_row(key) for key in state.keys])


# -- export -------------------------------------------------------------------------------


class ExportRun:
    """How far an export got: records written and the last stream position covered.

    A stop request (SIGINT or SIGTERM, see ``stop_on_signals``) is honoured only between
    records, so the resume position is exact: nothing written twice, nothing skipped.
    """

    def __init__(self, start: int) -> None:
        self.covered = start
        self.records = 0
        self.out: IO[str] | None = None
        self.bar: Any = None
        self.stop: Callable[[], bool] = lambda: False
        self.between_records = False
        self._bar_position = start

    def __repr__(self) -> str:
        return f"ExportRun(records={self.records}, covered={self.covered})"

    def _check(self) -> None:
        if self.stop():
            self.between_records = True  # (a stop at once, a second Ctrl-C, is not)
            raise KeyboardInterrupt

    def track(self, records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pass ``records`` on, counting each once the writer has asked for the next one."""
        for record in records:
            self._check()
            yield record
            self.records += 1
            self.covered = max(self.covered, int(record["position"]))

    def page(self, position: int) -> None:
        """A page of the stream is written: flush it and advance the bar."""
        if self.out is not None:
            self.out.flush()
        if self.bar is not None:
            self.bar.update(max(position - self._bar_position, 0))
            self._bar_position = position
        self.covered = max(self.covered, position)
        self._check()

    def summary(self) -> str:
        """The closing line on stderr, naming where a later run resumes."""
        return (
            f"Exported {self.records} records; resume after position {self.covered} "
            f"with --from-position {self.covered}"
        )


def settle_tail(run: ExportRun, out: IO[str], fmt: str, path: str) -> None:
    """After a stop at once (a second Ctrl-C, which may land in the middle of a write):
    cut a record the file holds only part of, and count one it holds whole, so that the
    resume position printed is exact for the file as it is left (found by review: a
    resumed export wrote a record again, after a line it had cut short). Every record
    is one line: no field of either format holds a line break (JSON escapes them, and
    keyledger's text fields refuse them)."""
    with suppress(OSError, ValueError):
        out.flush()
    with open(path, "rb") as written:  # (``out`` was opened for writing only)
        size = written.seek(0, os.SEEK_END)
        written.seek(max(size - TAIL_BYTES, 0))
        tail = written.read()
    end = tail.rfind(b"\n") + 1
    if end < len(tail):  # a last line without its line break: cut short
        os.truncate(path, size - (len(tail) - end))
    last = tail[:end].rstrip(b"\n").rsplit(b"\n", 1)[-1].decode("utf-8", "replace")
    with suppress(ValueError, KeyError, IndexError, TypeError):
        position = int(
            json.loads(last)["position"] if fmt == "jsonl" else next(csv.reader([last]))[0]
        )
        if position > run.covered:  # written whole, not counted yet
            run.covered = position
            run.records += 1


TAIL_BYTES = 1 << 20  # more than any one record (its fields are bounded in size)


@contextmanager
def open_output(path: str | None, *, append: bool) -> Iterator[IO[str]]:
    """FILE (appended to when resuming, else truncated), or stdout left open."""
    if path is None:
        yield sys.stdout
        return
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    try:
        # A new file is readable by its owner only: audit records name people (user ids,
        # addresses, user agents). An existing file keeps the mode it has.
        descriptor = os.open(path, flags, 0o600)
        with os.fdopen(descriptor, "a" if append else "w", encoding="utf-8", newline="") as out:
            yield out
    except OSError as error:  # opening, or writing (a full disk)
        raise click.ClickException(f"cannot write {path}: {error.strerror}") from None


def export_bar(cli: CliContext, output: str | None, start: int) -> AbstractContextManager[Any]:
    """A progress bar on stderr when a person watches it and stdout is not the export."""
    if output is None or not is_terminal("stderr"):
        return nullcontext(None)
    head = cli.service.read_model_status()["audit"][1]
    return click.progressbar(length=max(head - start, 0), label="Exporting", file=sys.stderr)


def write_records(
    run: ExportRun, records: Iterator[dict[str, Any]], fmt: str, header: bool
) -> None:
    """Write ``records`` to ``run.out`` as JSON lines or CSV."""
    assert run.out is not None
    if fmt == "csv":
        write_csv(run.track(records), run.out, header=header)
    else:
        write_jsonl(run.track(records), run.out)


@audit_group.command("export")
@click.option("--tenant", "tenant_id", metavar="TENANT", help="Only this tenant's records.")
@click.option("--all-tenants", is_flag=True, help="Every tenant's records.")
@click.option("--since", type=AWARE_DATETIME, help="From this time (inclusive), ISO 8601.")
@click.option("--until", type=AWARE_DATETIME, help="Before this time (exclusive), ISO 8601.")
@click.option(
    "--from-position",
    type=click.IntRange(min=0),
    metavar="POSITION",
    help="Resume: only records after this stream position, appended to FILE.",
)
@click.option("--format", "fmt", type=click.Choice(("jsonl", "csv")), required=True)
@output_option
@pass_cli
def export(
    cli: CliContext,
    tenant_id: str | None,
    all_tenants: bool,
    since: datetime | None,
    until: datetime | None,
    from_position: int | None,
    fmt: str,
    output: str | None,
) -> None:
    """Stream the audited events of one tenant, or of every tenant, in stream order.

    Give exactly one of --tenant and --all-tenants. Each record names its stream position;
    the closing line on stderr says where to resume (--from-position P appends to FILE;
    a CSV header is written only to an empty FILE, or to stdout when not resuming).
    Ctrl-C (or SIGTERM) stops between two records, names the resume position and exits
    130; a second Ctrl-C stops at once.
    """
    if (tenant_id is None) != all_tenants:
        raise click.UsageError("give --tenant TENANT or --all-tenants, exactly one")
    if tenant_id is not None:
        cli.refuse_unknown_tenant(tenant_id)
    run = ExportRun(from_position or 0)
    with super_admin() if all_tenants else nullcontext():  # a cross-tenant read
        records = cli.service.export_audit(
            tenant_id=tenant_id,
            since=since,
            until=until,
            after_position=run.covered,
            progress=run.page,
        )
    with open_output(output, append=from_position is not None) as out:
        run.out = out
        header = from_position is None if output is None else out.tell() == 0
        try:
            with stop_on_signals() as stop, export_bar(cli, output, run.covered) as bar:
                run.stop, run.bar = stop, bar
                write_records(run, records, fmt, header)
                if bar is not None:  # finished: the rest of the stream holds nothing to export
                    bar.update(max(bar.length - bar.pos, 0))
        except KeyboardInterrupt:
            if run.between_records or output is None:
                out.flush()
            else:  # stopped at once: the record being written may be cut short or uncounted
                settle_tail(run, out, fmt, output)
            click.echo(run.summary(), err=True)
            click.get_current_context().exit(INTERRUPTED)
    click.echo(run.summary(), err=True)
