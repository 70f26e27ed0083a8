"""Is the store's schema present and current? (``keyledger db check``)."""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from keyledger.application.ledger import Ledger
from keyledger.infrastructure.lost_tables import catalog_lost
from keyledger.infrastructure.pg_functions import (
    FUNCTIONS,
    GENERIC_PLANS_SETTING,
    append_only_statements,
    function_bodies,
)
from keyledger.projections.schema import has_events_key, has_table

EVENTS_KEY_MISSING = "primary key (originator_id, originator_version)"
REQUIRED_TABLES = ("kl_catalog", "kl_audit", "kl_keys", "kl_tracking", "kl_key_material")
REQUIRED_COLUMNS = {"kl_catalog": ("disabled", "expired", "deleted", "access_count")}


class SchemaStatus(BaseModel):
    """What ``db check`` found."""

    model_config = ConfigDict(frozen=True)

    store: str
    events_table: str
    present: bool
    missing: list[str]
    append_only_enforced: bool | None  # None: not applicable (SQLite)
    # What is in place but unsafe (PostgreSQL: a schema other roles may create objects
    # in); ``ok`` does not depend on it.
    warnings: list[str] = []
    # Key versions the key inventory lists as not destroyed that have no key material:
    # the table kl_key_material (or rows of it) lost, by a partial restore or a bad
    # migration; nothing under them can be decrypted until a backup gives them back.
    # None: not counted (the checking role may not read kl_key_material: PostgreSQL's
    # documented roles give that table to the application role).
    keys_without_material: int | None = 0

    @property
    def ok(self) -> bool:
        return (
            self.present
            and self.append_only_enforced is not False
            and not self.keys_without_material
        )


CATALOG_REBUILD_PENDING = (
    "kl_catalog and kl_keys contents (created anew in a store that has events; their "
    "rebuild from the stream has not finished)"
)


def check_schema(ledger: Ledger) -> SchemaStatus:
    """Look for every table, the columns this version needs, and the append-only trigger."""
    store = ledger.store
    postgres = store.position_column == "notification_id"
    snapshots = "keyledger_snapshots" if postgres else "stored_snapshots"
    tables = (store.events_table_name, snapshots, *REQUIRED_TABLES)
    with ledger.reading() as cur:
        missing = [table for table in tables if not has_table(cur, table, postgres)]
        events = store.events_table_name
        if events not in missing and not has_events_key(cur, events, postgres):
            missing.append(f"{events} {EVENTS_KEY_MISSING}")
        for table, columns in REQUIRED_COLUMNS.items():
            if table not in missing:
                missing += [
                    f"{table}.{column}"
                    for column in columns
                    if not _has_column(cur, table, column, postgres)
                ]
        if postgres:
            channel = cast(Any, store).channel_name  # the PostgreSQL recorder's
            bodies = function_bodies(store.events_table_name, channel)
            for name in FUNCTIONS:
                found = _function_definition(cur, name)
                if found is None:
                    missing.append(f"function {name}()")
                elif found != (bodies[name], True):
                    missing.append(f"function {name}() (current definition)")
        append_only = (
            all(
                _has_trigger(cur, store.events_table_name, name)
                for name in ("kl_events_append_only", "kl_events_no_truncate")
            )
            if postgres and store.events_table_name not in missing
            else (False if postgres else None)
        )
        # A catalog created anew whose rebuild has not finished (lost_tables): its
        # services would answer "no secrets" (found by review).
        if "kl_tracking" not in missing and catalog_lost(cur):
            missing.append(CATALOG_REBUILD_PENDING)
        warnings = (
            [*_open_schema_warnings(cur), *_position_warnings(cur, events)] if postgres else []
        )
        lost_material = (
            0
            if {"kl_keys", CATALOG_REBUILD_PENDING} & set(missing)
            else _keys_without_material(
                cur, table_lost="kl_key_material" in missing, postgres=postgres
            )
        )
    return SchemaStatus(
        store="postgresql" if postgres else "sqlite",
        events_table=store.events_table_name,
        present=not missing,
        missing=missing,
        append_only_enforced=append_only,
        warnings=warnings,
        keys_without_material=lost_material,
    )


def _keys_without_material(cur: Any, *, table_lost: bool, postgres: bool) -> int | None:
    """Key versions never destroyed whose material has no row (all of them when the
    table itself is missing: ``db init`` would only create it empty); None when this role
    may not read the table (found by review: the owner's `db init` and `db check`
    failed with "permission denied" once kl_key_material was the application's)."""
    if postgres and not table_lost:
        cur.execute("SELECT has_table_privilege('kl_key_material', 'SELECT')")
        if not cur.fetchone()[0]:
            return None
    query = "SELECT COUNT(*) FROM kl_keys AS k WHERE k.status <> 'destroyed'"
    if not table_lost:
        query += (
            " AND NOT EXISTS (SELECT 1 FROM kl_key_material AS m WHERE m.tenant_id = "
            "k.tenant_id AND m.version = k.version AND m.key_id = k.key_id)"
        )
    cur.execute(query)
    return int(cur.fetchone()[0])


def _open_schema_warnings(cur: Any) -> list[str]:
    """A warning when roles other than the schema's owner may create objects in it (the
    schema ``public`` before PostgreSQL 15, or a grant): such a role could put there a
    function or operator that the server functions, or keyledger's statements, would
    resolve to instead of the built-in one, and run its code with their rights."""
    cur.execute(
        "SELECT n.nspname, COALESCE(pg_catalog.string_agg(DISTINCT "
        "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE r.rolname END, ', '), '') "
        "FROM pg_catalog.pg_namespace AS n "
        "CROSS JOIN LATERAL pg_catalog.aclexplode("
        "COALESCE(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) AS a "
        "LEFT JOIN pg_catalog.pg_roles AS r ON r.oid = a.grantee "
        "WHERE n.nspname = pg_catalog.current_schema() AND a.privilege_type = 'CREATE' "
        "AND a.grantee <> n.nspowner GROUP BY n.nspname"
    )
    row = cur.fetchone()
    if row is None:
        return []
    return [
        f"roles other than its owner may create objects in schema {row[0]!r} ({row[1]}): "
        "one could shadow a function keyledger uses and run code with its rights; "
        f"revoke that (REVOKE CREATE ON SCHEMA {row[0]} FROM ...) or give keyledger a "
        "schema of its own (docs/postgresql.md, roles)"
    ]


def _position_warnings(cur: Any, events: str) -> list[str]:
    """A warning when roles other than the events table's owner may choose an event's
    position (INSERT on its position column: docs/postgresql.md before 0.21.0 granted it
    with the rest): one row at a chosen position stops the audit queries for good
    (``read_models._check_head_was_assigned``). Found by review: after an upgrade,
    nothing said the new grant was not in force. (The information schema shows the
    grants of the roles the checking role is, or owns the table of.)"""
    cur.execute(
        "SELECT pg_catalog.string_agg(DISTINCT p.grantee, ', ') "
        "FROM information_schema.column_privileges AS p "
        "JOIN pg_catalog.pg_tables AS t "
        "ON t.schemaname = p.table_schema AND t.tablename = p.table_name "
        "WHERE p.table_schema = pg_catalog.current_schema() AND p.table_name = ? "
        "AND p.column_name = 'notification_id' AND p.privilege_type = 'INSERT' "
        "AND p.grantee <> t.tableowner",
        (events,),
    )
    row = cur.fetchone()
    if row is None or not row[0]:
        return []
    return [
        f"roles other than its owner may choose an event's position ({row[0]}: INSERT "
        f"on {events}.notification_id): one such row stops the audit queries; grant "
        "INSERT on the other four columns only (docs/postgresql.md, roles)"
    ]


def is_legacy_stream(ledger: Ledger) -> bool:
    """Whether the stream was written by keyledger 0.1.0, whose aggregate ids (UUIDv5 and
    UUIDv7) carry no tenant prefix: this version would not find its secrets. Every id this
    version writes is a UUIDv8 (``domain/ids.py``); the first event decides."""
    store = ledger.store
    try:
        with ledger.reading() as cur:
            cur.execute(
                f"SELECT originator_id FROM {store.events_table_name} "
                f"ORDER BY {store.position_column} LIMIT 1"
            )
            row = cur.fetchone()
    except Exception:  # no events table yet (tables not created): nothing legacy in it
        return False
    if row is None:
        return False
    first = row[0] if isinstance(row[0], UUID) else UUID(str(row[0]))
    return first.version != 8


def _has_column(cur: Any, table: str, column: str, postgres: bool) -> bool:
    if postgres:
        cur.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name=? AND column_name=?",
            (table, column),
        )
        return cur.fetchone() is not None
    cur.execute(f"SELECT 1 FROM pragma_table_info('{table}') WHERE name=?", (column,))
    return cur.fetchone() is not None


# The body of the refusing trigger function, as the server keeps it (pg_proc.prosrc).
_REFUSING_BODY = append_only_statements("events")[0].split("$$")[1]
# pg_trigger.tgtype bits: ROW 1, BEFORE 2, DELETE 8, UPDATE 16, TRUNCATE 32.
_TRIGGER_TYPES = {"kl_events_append_only": 1 | 2 | 8 | 16, "kl_events_no_truncate": 2 | 32}


def _has_trigger(cur: Any, table: str, name: str) -> bool:
    """Whether the trigger is in force on this schema's table (not on a namesake
    elsewhere): enabled for ordinary sessions (not disabled, nor only for replication),
    firing before the operations it refuses, and calling this schema's refusing function
    with the body ``db init`` gives it (not one replaced to let rows through)."""
    cur.execute(
        "SELECT t.tgtype, p.prosrc FROM pg_trigger AS t "
        "JOIN pg_proc AS p ON p.oid = t.tgfoid "
        "JOIN pg_namespace AS n ON n.oid = p.pronamespace "
        "WHERE t.tgrelid = to_regclass(?) AND t.tgname=? AND NOT t.tgisinternal "
        "AND t.tgenabled IN ('O', 'A') AND n.nspname = current_schema() "
        "AND p.proname = 'kl_refuse_event_change'",
        (table, name),
    )
    row = cur.fetchone()
    if row is None:
        return False
    wanted = _TRIGGER_TYPES[name]
    return int(row[0]) & wanted == wanted and row[1] == _REFUSING_BODY


def _function_definition(cur: Any, name: str) -> tuple[str, bool] | None:
    """The body of this schema's function ``name`` (the schema first on the search path),
    and whether it runs with generic plans; None: no such function. A function made by an
    older version (another body, or without the setting) is replaced by ``db init``."""
    cur.execute(
        "SELECT pg_proc.prosrc, pg_proc.proconfig FROM pg_proc JOIN pg_namespace "
        "ON pg_namespace.oid = pg_proc.pronamespace "
        "WHERE pg_namespace.nspname = current_schema() AND pg_proc.proname = ?",
        (name,),
    )
    row = cur.fetchone()
    if row is None:
        return None
    return row[0], GENERIC_PLANS_SETTING in (row[1] or [])
