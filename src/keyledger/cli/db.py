"""``keyledger db``: create the store's schema explicitly and check that it is current.

Both commands open the store with ``create_tables=False``, so ``db check`` never creates
anything, and ``db init`` can say what it created: it checks, creates, then checks again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from keyledger.application.schema_check import (
    CATALOG_REBUILD_PENDING,
    EVENTS_KEY_MISSING,
    SchemaStatus,
)
from keyledger.cli.errors import KeyledgerSubgroup
from keyledger.cli.render import emit_json, json_option, to_data
from keyledger.cli.root import CliContext, pass_cli
from keyledger.errors import InvalidInput
from keyledger.infrastructure.database_url import sqlite_db_name
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.service import SecretService


@click.group("db", cls=KeyledgerSubgroup)
def db_group() -> None:
    """Create and check the store's schema; shred deleted key material from its files."""


@contextmanager
def schema_service(cli: CliContext) -> Iterator[SecretService]:
    """A service on the CLI's store that never creates tables on its own."""
    settings = KeyledgerSettings(create_tables=False)  # InvalidInput names what is wrong
    service = SecretService.create(cli.database_url, settings=settings)
    try:
        yield service
    finally:
        service.close()


def _absent_sqlite_file(database_url: str | None) -> Path | None:
    """The file of a ``sqlite:///`` URL (given, or configured) when it does not exist
    (None for other stores)."""
    if database_url is None:
        try:
            database_url = KeyledgerSettings().database_url.get_secret_value()
        except InvalidInput:
            return None  # opening the store reports it
    if not database_url.startswith("sqlite:") or database_url == "sqlite:///:memory:":
        return None
    try:
        path = Path(sqlite_db_name(database_url))
    except InvalidInput:
        return None  # opening the store reports it
    return None if path.exists() else path


def status_data(status: SchemaStatus) -> dict[str, Any]:
    """What a check found, as JSON data with its verdict."""
    return {**to_data(status), "ok": status.ok}


def _trigger_text(status: SchemaStatus) -> str:
    if status.append_only_enforced is None:
        return f"not applicable ({status.store})"
    return "installed" if status.append_only_enforced else "missing"


def emit_status(status: SchemaStatus) -> None:
    """The check's findings, one ``label: value`` line each."""
    lines = (
        ("Store", f"{status.store} (events table {status.events_table})"),
        ("Missing", ", ".join(status.missing) or "nothing"),
        ("Append-only trigger", _trigger_text(status)),
        ("Key material", _material_text(status)),
    )
    width = max(len(label) for label, _ in lines) + 1
    for label, value in lines:
        click.echo(f"{label + ':':<{width}} {value}")
    for warning in status.warnings:
        click.echo(f"Warning: {warning}", err=True)


def _material_text(status: SchemaStatus) -> str:
    if status.keys_without_material is None:
        return "not checked (this role may not read kl_key_material)"
    if status.keys_without_material:
        return f"MISSING for {status.keys_without_material} key version(s)"
    unchecked = {"kl_keys", CATALOG_REBUILD_PENDING} & set(status.missing)
    return "not checked (no key inventory)" if unchecked else "present for every key version"


MATERIAL_RESTORE = (
    "key material is missing for {count} key version(s) that were never destroyed "
    "(kl_key_material lost rows, or was created anew): nothing under them can be "
    "decrypted; restore kl_key_material from a backup (docs/operations.md section 6) "
    "before any drift repair, which would delete those secrets for good"
)


def _not_ready(status: SchemaStatus) -> str:
    problems = [f"missing {', '.join(status.missing)}"] if status.missing else []
    if status.append_only_enforced is False:
        problems.append("the append-only trigger is not installed")
    return f"the {status.store} schema is not ready: {'; '.join(problems)}"


def _rebuild_hint(status: SchemaStatus) -> str:
    """How to add the missing columns of a read-model table, which ``db init`` never
    alters: a rebuild makes the table anew with the current columns."""
    if any("." in item.split(" ", 1)[0] for item in status.missing):
        return (
            "; a read-model table lacks a column: `keyledger projections rebuild` "
            "(as the tables' owner) makes it anew with the current columns"
        )
    return ""


@db_group.command("init")
@json_option
@pass_cli
def init(cli: CliContext) -> None:
    """Create every table, index and trigger the store needs; safe to run again.

    Run it once per database (and schema) before the first `keyledger` process starts,
    with the role that should own the tables; then processes can run with
    KEYLEDGER_CREATE_TABLES=false.
    """
    with schema_service(cli) as service:
        before = service.check_schema()
        after = service.init_schema()
    created = [item for item in before.missing if item not in after.missing]
    installed_trigger = before.append_only_enforced is False and bool(after.append_only_enforced)
    if cli.json_output:
        emit_json(
            {"created": created, "installed_append_only_trigger": installed_trigger}
            | status_data(after)
        )
    else:
        click.echo(f"Created: {', '.join(created) or 'nothing, the tables were already there'}")
        if installed_trigger:
            click.echo(f"Installed the append-only trigger on {after.events_table}.")
        emit_status(after)
    if after.keys_without_material:
        raise click.ClickException(MATERIAL_RESTORE.format(count=after.keys_without_material))
    if not after.ok:
        raise click.ClickException(
            f"{_not_ready(after)} after init (existing tables are never altered)"
            + _rebuild_hint(after)
        )


@db_group.command("check")
@json_option
@pass_cli
def check(cli: CliContext) -> None:
    """Say whether the schema is present and current; creates nothing.

    Exits 0 when it is, 1 when something is missing (run `keyledger db init`).
    """
    absent = _absent_sqlite_file(cli.database_url)
    if absent is not None:  # opening it would create it
        status = SchemaStatus(
            store="sqlite",
            events_table="stored_events",
            present=False,
            missing=[f"the database file {absent}"],
            append_only_enforced=None,
        )
    else:
        with schema_service(cli) as service:
            status = service.check_schema()
    if cli.json_output:
        emit_json(status_data(status))
    else:
        emit_status(status)
    if not status.ok:
        if status.keys_without_material:  # (db init would create the table empty)
            raise click.ClickException(MATERIAL_RESTORE.format(count=status.keys_without_material))
        if any(item.endswith(EVENTS_KEY_MISSING) for item in status.missing):
            raise click.ClickException(  # (db init cannot give a table its key back)
                f"{_not_ready(status)}; the events table was altered outside keyledger: "
                "run `keyledger audit verify`, and restore the store from a backup"
            )
        raise click.ClickException(
            f"{_not_ready(status)}; run `keyledger db init`" + _rebuild_hint(status)
        )


@db_group.command("shred")
@json_option
@pass_cli
def shred(cli: CliContext) -> None:
    """Drop deleted key material from the store's files (crypto-shredding) now.

    Key cleanup, tenant erasure, drift repair and master-key rewrap do this themselves;
    run it when one of them reported that it could not (SQLite: a reader held an old
    snapshot; PostgreSQL: the role does not own kl_key_material: run it as the owner).
    """
    cli.service.shred_key_material()
    if cli.json_output:
        emit_json({"shredded": True})
    else:
        click.echo("Shredded: deleted key material is gone from the store's files.")


@db_group.command("backup")
@click.argument("target", type=click.Path(dir_okay=False, writable=True))
@json_option
@pass_cli
def backup(cli: CliContext, target: str) -> None:
    """Copy a SQLite store, one consistent snapshot, into the new file TARGET.

    Writers go on meanwhile. Never copy the database file itself: in WAL mode recent
    writes live in its -wal file, and a copy of the database alone can be an empty store.
    TARGET is created readable by its owner only and is never written over. It holds the
    wrapped keys and the ciphertexts: keep it as safe as the store, and as short-lived
    as your erasure deadline allows (a tenant erased later is still in it). On
    PostgreSQL, use its own tools (pg_dump, base backups).
    """
    cli.service.backup(target)
    if cli.json_output:
        emit_json({"backup": target})
    else:
        click.echo(f"Backed up the store to {target}.")
