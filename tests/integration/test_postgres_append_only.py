"""The PostgreSQL event table is append-only in the database itself, whatever the client.

Raw SQL through psycopg (not keyledger) tries to change or remove stored events; the server
must refuse every attempt and leave every row as it was. Each test has its own schema.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conftest import POSTGRES_URL, drop_schema
from keyledger import SecretService, super_admin

pytestmark = pytest.mark.postgres

# Statements that would change the stream; {t} is the schema-qualified event table.
TAMPERING = {
    "update one row's state": "UPDATE {t} SET state = 'x'::bytea "
    "WHERE notification_id = (SELECT min(notification_id) FROM {t})",
    "update every row's topic": "UPDATE {t} SET topic = 'forged'",
    "renumber the stream": "UPDATE {t} SET notification_id = notification_id + 1000",
    "delete one row": "DELETE FROM {t} "
    "WHERE notification_id = (SELECT max(notification_id) FROM {t})",
    "delete every row": "DELETE FROM {t}",
    "truncate": "TRUNCATE {t}",
    "truncate cascade": "TRUNCATE {t} CASCADE",
    "truncate only": "TRUNCATE ONLY {t} RESTART IDENTITY",
}


@pytest.fixture
def service(schema: str) -> Iterator[SecretService]:
    """A service on the test's schema holding a few events of two tenants."""
    with SecretService.create(
        f"{POSTGRES_URL}?schema={schema}", master_key=secrets.token_hex(32)
    ) as opened:
        opened.store_for_tenant("tenant-a", "api-key", "value-a", user_id="alice")
        opened.store_for_tenant("tenant-a", "api-key", "value-a2", user_id="alice")
        opened.retrieve_for_tenant("tenant-a", "api-key", user_id="alice")
        opened.store_for_tenant("tenant-b", "db-password", "value-b")
        opened.rotate_key_for_tenant("tenant-b")
        yield opened


@pytest.fixture
def raw(schema: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection, outside keyledger."""
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET lock_timeout = '5s'")
        conn.execute("SET statement_timeout = '10s'")
        yield conn


def _table(schema: str) -> sql.Composed:
    return sql.SQL("{}.keyledger_events").format(sql.Identifier(schema))


def _rows(conn: psycopg.Connection[Any], schema: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        sql.SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state "
            "FROM {} ORDER BY notification_id"
        ).format(_table(schema))
    ).fetchall()


def _tamper(schema: str, statement: str) -> sql.Composed:
    return sql.SQL(statement).format(t=_table(schema))  # type: ignore[arg-type]


@pytest.mark.parametrize("statement", TAMPERING.values(), ids=list(TAMPERING))
def test_the_server_refuses_to_change_or_remove_stored_events_with_raw_sql(
    service: SecretService, raw: psycopg.Connection[Any], schema: str, statement: str
) -> None:
    before = _rows(raw, schema)
    assert len(before) >= 5

    with pytest.raises(psycopg.Error, match="append-only"):
        raw.execute(_tamper(schema, statement))

    assert _rows(raw, schema) == before


@pytest.mark.parametrize("statement", TAMPERING.values(), ids=list(TAMPERING))
def test_the_server_refuses_the_same_changes_inside_an_explicit_transaction(
    service: SecretService, raw: psycopg.Connection[Any], schema: str, statement: str
) -> None:
    before = _rows(raw, schema)

    def tamper_in_a_transaction() -> None:
        with raw.transaction():
            raw.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(_table(schema)))
            raw.execute(_tamper(schema, statement))

    with pytest.raises(psycopg.Error, match="append-only"):
        tamper_in_a_transaction()

    assert _rows(raw, schema) == before


def test_a_refused_change_leaves_the_audit_log_and_the_secrets_exactly_as_they_were(
    service: SecretService, raw: psycopg.Connection[Any], schema: str
) -> None:
    with super_admin():
        audit = service.get_audit_logs(limit=10_000)
    listed = service.list_for_tenant("tenant-a", status=None, include_expired=True)

    for statement in TAMPERING.values():
        with pytest.raises(psycopg.Error):
            raw.execute(_tamper(schema, statement))
    service.rebuild_read_models()

    with super_admin():
        assert service.get_audit_logs(limit=10_000) == audit
    assert service.list_for_tenant("tenant-a", status=None, include_expired=True) == listed
    assert service.retrieve_for_tenant("tenant-a", "api-key").value == "value-a2"
    assert service.retrieve_for_tenant("tenant-b", "db-password").value == "value-b"
    # Appends through keyledger still work after the refusals.
    assert service.store_for_tenant("tenant-a", "api-key", "value-a3").version == 3
    assert service.retrieve_for_tenant("tenant-a", "api-key").value == "value-a3"


def test_schema_init_reports_the_append_only_guard_and_is_safe_to_run_twice(
    service: SecretService,
) -> None:
    first = service.init_schema()
    second = service.init_schema()

    assert first.store == "postgresql"
    assert first.present
    assert first.missing == []
    assert first.append_only_enforced is True
    assert first.ok
    assert second == first
    assert service.check_schema() == first


def test_schema_check_notices_when_this_schemas_append_only_guard_is_gone(
    service: SecretService, raw: psycopg.Connection[Any], schema: str
) -> None:
    # Another schema on the same server keeps its guard: the check must look at this one.
    other = f"{schema}_other"
    try:
        with SecretService.create(
            f"{POSTGRES_URL}?schema={other}", master_key=secrets.token_hex(32)
        ) as elsewhere:
            assert elsewhere.check_schema().append_only_enforced is True

        raw.execute(sql.SQL("DROP TRIGGER kl_events_append_only ON {}").format(_table(schema)))

        status = service.check_schema()
        assert status.append_only_enforced is False
        assert not status.ok
    finally:
        drop_schema(other)


def test_schema_check_notices_when_only_the_truncate_guard_is_gone(
    service: SecretService, raw: psycopg.Connection[Any], schema: str
) -> None:
    raw.execute(sql.SQL("DROP TRIGGER kl_events_no_truncate ON {}").format(_table(schema)))

    assert service.check_schema().append_only_enforced is False


def test_schema_init_reinstalls_a_dropped_append_only_guard(
    service: SecretService, raw: psycopg.Connection[Any], schema: str
) -> None:
    before = _rows(raw, schema)
    raw.execute(sql.SQL("DROP TRIGGER kl_events_append_only ON {}").format(_table(schema)))
    raw.execute(sql.SQL("DROP TRIGGER kl_events_no_truncate ON {}").format(_table(schema)))

    assert service.init_schema().append_only_enforced is True

    for statement in TAMPERING.values():
        with pytest.raises(psycopg.Error, match="append-only"):
            raw.execute(_tamper(schema, statement))
    assert _rows(raw, schema) == before


# -- functions and operators planted in the schema (search_path hijacking) -----------------

# Built-ins with polymorphic arguments lose to a function of the exact argument types in any
# schema on the search path; these traps would run in place of the server functions' calls
# (a role that may create objects in the schema could plant them, running its code with the
# rights of whoever calls keyledger's functions, its table owner included).
TRAPS = (
    "CREATE FUNCTION {s}.kl_trap_step(bigint[], bigint) RETURNS bigint[] LANGUAGE plpgsql "
    "AS $$ BEGIN RAISE EXCEPTION 'planted array_agg ran'; END $$",
    "CREATE AGGREGATE {s}.array_agg(bigint) (SFUNC = {s}.kl_trap_step, STYPE = bigint[])",
    "CREATE FUNCTION {s}.cardinality(uuid[]) RETURNS integer LANGUAGE plpgsql "
    "AS $$ BEGIN RAISE EXCEPTION 'planted cardinality ran'; END $$",
    "CREATE FUNCTION {s}.array_append(bigint[], bigint) RETURNS bigint[] LANGUAGE plpgsql "
    "AS $$ BEGIN RAISE EXCEPTION 'planted array_append ran'; END $$",
)


def test_functions_planted_in_the_schema_do_not_run_in_keyledgers_server_functions(
    service: SecretService, raw: psycopg.Connection[Any], schema: str
) -> None:
    for trap in TRAPS:
        raw.execute(sql.SQL(trap).format(s=sql.Identifier(schema)))

    service.rotate_key_for_tenant("tenant-a")  # a unit of several events: kl_append_unit_v1
    service.store_for_tenant("tenant-a", "api-key", "value-a3")
    assert service.retrieve_for_tenant("tenant-a", "api-key").value == "value-a3"
    with super_admin():
        assert [k.version for k in service.list_keys("tenant-a")] == [1, 2]


def test_schema_check_warns_when_other_roles_may_create_objects_in_the_schema(
    service: SecretService, raw: psycopg.Connection[Any], schema: str
) -> None:
    assert service.check_schema().warnings == []

    raw.execute(sql.SQL("GRANT CREATE ON SCHEMA {} TO PUBLIC").format(sql.Identifier(schema)))
    status = service.check_schema()

    assert status.ok  # a warning: the schema is complete
    (warning,) = status.warnings
    assert f"schema {schema!r} (PUBLIC)" in warning
    raw.execute(sql.SQL("REVOKE CREATE ON SCHEMA {} FROM PUBLIC").format(sql.Identifier(schema)))
    assert service.check_schema().warnings == []
