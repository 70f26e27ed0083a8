"""Key material that keyledger deletes leaves the database files (crypto-shredding).

Deleting a row is not enough: PostgreSQL keeps its bytes in the table's pages until the
table file is rewritten, and SQLite keeps copies of changed pages in its write-ahead log
until a checkpoint truncates it. These tests look at the bytes themselves: the table's
file read by the server (``pg_read_binary_file`` after a ``CHECKPOINT``), or every file in
a SQLite database's directory. And where a shred cannot be done (a PostgreSQL role that
does not own the table, a SQLite reader holding an old snapshot) the caller is told:
``ShredIncomplete``, with the destruction itself in force.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql

from conftest import POSTGRES_URL, RUN_ID, MakeService, own_schema
from keyledger import (
    DecryptionFailed,
    SecretService,
    ShredIncomplete,
    StorageError,
    super_admin,
)
from keyledger.cli import main
from keyledger.infrastructure import postgres_store, unit_writer
from keyledger.infrastructure.pg_vacuum_report import REPORTING_ROUTINE, ServerNotice
from keyledger.infrastructure.settings import KeyledgerSettings


def wrapped_material(service: SecretService, tenant_id: str) -> list[bytes]:
    """The wrapped data keys of a tenant, as the store holds them."""
    with service._ledger.reading() as cur:
        cur.execute("SELECT wrapped FROM kl_key_material WHERE tenant_id = ?", (tenant_id,))
        return [bytes(row[0]) for row in cur.fetchall()]


def stored_bytes(service: SecretService) -> bytes:
    """Every byte of the store where key material lives: on PostgreSQL the key-material
    table's file as the server has it after a checkpoint; on SQLite every file in the
    database's directory (the database, its WAL and shared-memory files)."""
    env = service._ledger.env
    schema = env.get("POSTGRES_SCHEMA")
    if schema:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
            table = sql.Identifier(schema, "kl_key_material").as_string(conn)
            path = conn.execute("SELECT pg_relation_filepath(%s::regclass)", (table,)).fetchone()
            assert path is not None
            data = conn.execute("SELECT pg_read_binary_file(%s)", (path[0],)).fetchone()
            assert data is not None
            return bytes(data[0])
    directory = Path(str(env.get("SQLITE_DBNAME"))).parent
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def on_disk(request: pytest.FixtureRequest) -> str:
    """The stores whose files the tests can read (memory has none)."""
    return str(request.param)


@pytest.fixture
def backend(on_disk: str, request: pytest.FixtureRequest) -> str:
    """Overrides conftest's ``backend``: only the stores with files."""
    if on_disk == "postgres":
        request.getfixturevalue("_postgres_server")
    return on_disk


def test_a_rewrap_leaves_no_copy_wrapped_by_the_old_master_key(
    make_service: MakeService, master_key: str
) -> None:
    first = make_service()
    for i in range(3):
        first.store_for_tenant("acme", f"s{i}", f"value-{i}")
    first.rotate_key_for_tenant("acme")
    first.store_for_tenant("acme", "late", "late-value")
    old_copies = wrapped_material(first, "acme")
    assert len(old_copies) == 2
    assert all(blob in stored_bytes(first) for blob in old_copies)  # the scan finds them
    first.close()
    new_key = secrets.token_hex(32)
    second = make_service(
        master_key=new_key, settings=KeyledgerSettings(previous_master_keys=master_key)
    )

    result = second.rewrap_master_key()

    assert result.rewrapped == 2
    new_copies = wrapped_material(second, "acme")
    files = stored_bytes(second)
    assert all(blob in files for blob in new_copies)
    assert [blob for blob in old_copies if blob in files] == []
    assert second.retrieve_for_tenant("acme", "s0").value == "value-0"


def test_erasure_leaves_no_copy_of_the_tenants_keys_in_the_store(
    service: SecretService,
) -> None:
    service.store_for_tenant("doomed", "s", "v")
    service.rotate_key_for_tenant("doomed")
    service.store_for_tenant("doomed", "s", "v2")
    service.store_for_tenant("kept", "s", "v")
    doomed, kept = wrapped_material(service, "doomed"), wrapped_material(service, "kept")

    service.erase_tenant("doomed", confirm=True)

    files = stored_bytes(service)
    assert [blob for blob in doomed if blob in files] == []
    assert all(blob in files for blob in kept)


@pytest.mark.parametrize("on_disk", ["sqlite"], indirect=True)
def test_a_reader_holding_an_old_sqlite_snapshot_makes_the_shred_incomplete(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch, master_key: str
) -> None:
    """Until ``keyledger db shred`` runs once the reader has gone."""
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 0.2)
    service = make_service(settings=KeyledgerSettings(lock_timeout_seconds=1))
    service.store_for_tenant("doomed", "s", "v")
    service.store_for_tenant("kept", "s", "v")
    doomed = wrapped_material(service, "doomed")
    database = str(service._ledger.env.get("SQLITE_DBNAME"))
    reader = sqlite3.connect(database)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM kl_key_material").fetchone()  # an old snapshot

    with pytest.raises(ShredIncomplete, match="write-ahead log"):
        service.erase_tenant("doomed", confirm=True)

    with pytest.raises(DecryptionFailed):  # the destruction is in force all the same
        service.retrieve_for_tenant("doomed", "s")
    cli = CliRunner()
    env = {
        "KEYLEDGER_DATABASE_URL": f"sqlite:///{database}",
        "KEYLEDGER_MASTER_KEY": master_key,
        "KEYLEDGER_LOCK_TIMEOUT_SECONDS": "1",
    }
    busy = cli.invoke(main, ["db", "shred"], env=env)
    assert busy.exit_code == 1
    assert busy.stderr.startswith("Error: the SQLite write-ahead log")
    assert "a reader of an older snapshot" in busy.stderr
    assert [blob for blob in doomed if blob in stored_bytes(service)] != []  # still in the WAL
    reader.rollback()
    reader.close()

    done = cli.invoke(main, ["db", "shred"], env=env)

    assert done.exit_code == 0, done.stderr
    assert [blob for blob in doomed if blob in stored_bytes(service)] == []


def test_a_sqlite_checkpoint_that_fails_makes_the_shred_incomplete_not_a_raw_error(
    make_service: MakeService, backend: str
) -> None:
    """A full disk or an I/O error in the checkpoint after an erasure committed (found by
    review with a fault-injecting shim: a raw ``sqlite3.OperationalError``, and the CLI
    printed a traceback). Here SQLite's authorizer refuses the checkpoint's PRAGMA."""
    if backend != "sqlite":
        pytest.skip("the SQLite checkpoint")
    service = make_service()
    service.store_for_tenant("doomed", "s", "v")
    with service._ledger.store._datastore.writer() as conn:
        raw = conn.raw

    def no_checkpoint(action: int, arg1: str | None, *_: object) -> int:
        refused = action == sqlite3.SQLITE_PRAGMA and arg1 == "wal_checkpoint"
        return sqlite3.SQLITE_DENY if refused else sqlite3.SQLITE_OK

    raw.set_authorizer(no_checkpoint)
    with pytest.raises(ShredIncomplete, match="could not be shredded") as raised:
        service.erase_tenant("doomed", confirm=True)
    assert "not authorized" in str(raised.value)
    assert wrapped_material(service, "doomed") == []  # the erasure is in force
    assert service._ledger.shred_pending()
    raw.set_authorizer(None)

    service.shred_key_material()

    assert not service._ledger.shred_pending()


def cli_behind_an_old_snapshot(database: str, master_key: str, *args: str) -> Result:
    """The CLI's ``args`` on the SQLite store ``database`` while another connection holds
    an old snapshot of it (so a shred cannot finish)."""
    reader = sqlite3.connect(database)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM kl_key_material").fetchone()
        env = {
            "KEYLEDGER_DATABASE_URL": f"sqlite:///{database}",
            "KEYLEDGER_MASTER_KEY": master_key,
        }
        return CliRunner().invoke(main, list(args), env=env)
    finally:
        reader.rollback()
        reader.close()


def test_an_erasure_whose_shred_is_incomplete_still_reports_what_it_destroyed(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch, master_key: str, backend: str
) -> None:
    """It exited 1 with nothing but the error, and a rerun reported nothing destroyed, so
    the destroyed versions were never reported (found by review)."""
    if backend != "sqlite":
        pytest.skip("a SQLite reader holds the old snapshot")
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 0.2)
    service = make_service()
    service.store_for_tenant("doomed", "s", "v")
    service.rotate_key_for_tenant("doomed")
    database = str(service._ledger.env.get("SQLITE_DBNAME"))

    erased = cli_behind_an_old_snapshot(
        database, master_key, "--json", "tenants", "erase", "doomed", "--yes"
    )

    assert erased.exit_code == 1
    assert json.loads(erased.stdout) == {"tenant_id": "doomed", "destroyed_key_versions": [1, 2]}
    assert erased.stderr.startswith("Error: the SQLite write-ahead log, which may still hold")
    assert erased.stderr.count("\n") == 1


def test_a_repair_whose_shred_is_incomplete_still_reports_what_it_deleted(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch, master_key: str, backend: str
) -> None:
    """As for an erasure: the repair deleted an unrecoverable secret and destroyed its
    key version, then said nothing of it (found by review)."""
    if backend != "sqlite":
        pytest.skip("a SQLite reader holds the old snapshot")
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 0.2)
    service = make_service()
    service.store_for_tenant("acme", "a", "v")
    service.rotate_key_for_tenant("acme")
    service.store_for_tenant("acme", "b", "w")
    database = str(service._ledger.env.get("SQLITE_DBNAME"))
    with sqlite3.connect(database) as raw:  # version 1's material lost (a bad restore)
        raw.execute(
            "UPDATE kl_key_material SET wrapped = zeroblob(60) "
            "WHERE tenant_id = 'acme' AND version = 1"
        )
    service.close()

    repaired = cli_behind_an_old_snapshot(
        database, master_key, "--json", "drift", "repair", "acme", "--yes"
    )

    assert repaired.exit_code == 1
    result = json.loads(repaired.stdout)
    assert (result["secret_names"], result["key_versions"]) == (["a"], [1])
    assert repaired.stderr.startswith("Error: the SQLite write-ahead log, which may still hold")


# -- PostgreSQL roles (docs/postgresql.md) ------------------------------------------------


def _as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{role}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def app_role(_postgres_server: None) -> Iterator[str]:
    """A login role for the application, dropped (with what it owns) afterwards."""
    role = f"kl_app_{RUN_ID}_{secrets.token_hex(3)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    yield role
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _grant_documented_privileges(schema: str, role: str, *, own_key_material: bool) -> None:
    """The grants of docs/postgresql.md, made by the schema's owner (here the superuser)."""
    ident, who = sql.Identifier(schema), sql.Identifier(role)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(ident))
        for statement in (
            "GRANT USAGE ON SCHEMA {s} TO {r}",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r}",
            # events: INSERT without choosing the position
            "REVOKE INSERT ON {s}.keyledger_events FROM {r}",
            "GRANT INSERT (originator_id, originator_version, topic, state) "
            "ON {s}.keyledger_events TO {r}",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
            "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {s} TO {r}",
            # tables the owner makes later (a rebuild's) come with the same grants
            "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} "
            "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}",
        ):
            conn.execute(sql.SQL(statement).format(s=ident, r=who))
        if own_key_material:
            conn.execute(sql.SQL("ALTER TABLE {}.kl_key_material OWNER TO {}").format(ident, who))


def _app_service(
    url: str, schema: str, role: str, master_key: str, own_key_material: bool
) -> SecretService:
    """The schema made by its owner (the superuser), then a service of the application
    role with the documented grants."""
    SecretService.create(url, master_key=master_key).close()  # creates the schema
    _grant_documented_privileges(schema, role, own_key_material=own_key_material)
    return SecretService.create(
        _as_role(url, role), master_key=master_key, settings=KeyledgerSettings(create_tables=False)
    )


@pytest.mark.postgres
def test_the_documented_application_role_works_but_cannot_choose_a_position(
    app_role: str, master_key: str
) -> None:
    """Its writes take the sequence's positions (every keyledger path names the four
    other columns); a row of its own at a chosen position would hide later events from
    the audit queries (docs/postgresql.md)."""
    with own_schema("roles") as schema:
        url = f"{POSTGRES_URL}?schema={schema}"
        app = _app_service(url, schema, app_role, master_key, True)
        try:
            app.store_for_tenant("acme", "s", "v1")
            app.store_for_tenant("acme", "s", "v2")
            app.rotate_key_for_tenant("acme")
            assert app.reencrypt_all_for_tenant("acme").failed == 0
            assert app.retrieve_for_tenant("acme", "s").value == "v2"
            with super_admin():
                assert len(app.get_audit_logs(tenant_id="acme")) >= 5
        finally:
            app.close()
        with (
            psycopg.connect(_as_role(POSTGRES_URL, app_role), autocommit=True) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.keyledger_events (notification_id, originator_id, "
                    "originator_version, topic, state) "
                    "VALUES (1000000, gen_random_uuid(), 1, 'x', 'x')"
                ).format(sql.Identifier(schema))
            )


@pytest.mark.postgres
def test_db_check_warns_while_the_application_role_may_choose_a_position(
    app_role: str, master_key: str
) -> None:
    """docs/postgresql.md before 0.21.0 granted INSERT on every column of the events
    table: after an upgrade nothing said the new column grant was not in force (found by
    review)."""
    with own_schema("roles") as schema:
        url = f"{POSTGRES_URL}?schema={schema}"
        app = _app_service(url, schema, app_role, master_key, True)
        app.close()
        owner = SecretService.create(url, master_key=master_key)
        try:
            assert not any("position" in w for w in owner.check_schema().warnings)
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(  # the grant of 0.20.0's docs
                    sql.SQL("GRANT INSERT ON {}.keyledger_events TO {}").format(
                        sql.Identifier(schema), sql.Identifier(app_role)
                    )
                )
            warnings = owner.check_schema().warnings
        finally:
            owner.close()
        assert [w for w in warnings if "choose an event's position" in w] == [
            f"roles other than its owner may choose an event's position ({app_role}: "
            "INSERT on keyledger_events.notification_id): one such row stops the audit "
            "queries; grant INSERT on the other four columns only (docs/postgresql.md, "
            "roles)"
        ]


@pytest.mark.postgres
def test_a_repair_that_must_rebuild_says_so_to_a_role_that_may_not(
    app_role: str, master_key: str
) -> None:
    """A repair rebuilds read models that disagree with the stream before it plans; the
    application role may not (a rebuild makes tables), and it said only "permission
    denied for schema ..." (found by review)."""
    with own_schema("roles") as schema:
        url = f"{POSTGRES_URL}?schema={schema}"
        app = _app_service(url, schema, app_role, master_key, True)
        try:
            app.store_for_tenant("acme", "s", "v")
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("UPDATE {}.kl_catalog SET envelope_version = NULL").format(
                        sql.Identifier(schema)
                    )
                )
            with pytest.raises(StorageError, match="as the tables' owner, then the repair"):
                app.repair_tenant_secret_key_drift("acme", confirm_delete_unrecoverable_data=True)
            assert app.retrieve_for_tenant("acme", "s").value == "v"
        finally:
            app.close()


@pytest.mark.postgres
def test_db_check_by_a_role_that_may_not_read_the_key_material_says_not_checked(
    app_role: str, master_key: str
) -> None:
    """The documented roles give kl_key_material to the application: the owner's later
    `db init` and `db check` failed with "permission denied" when the check began to
    count key versions without material (found by review)."""
    with own_schema("roles") as schema:
        url = f"{POSTGRES_URL}?schema={schema}"
        app = _app_service(url, schema, app_role, master_key, False)
        app.store_for_tenant("acme", "s", "v")
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("REVOKE SELECT ON {}.kl_key_material FROM {}").format(
                    sql.Identifier(schema), sql.Identifier(app_role)
                )
            )
        try:
            status = app.check_schema()
        finally:
            app.close()
        assert status.keys_without_material is None
        assert status.ok


@pytest.mark.postgres
@pytest.mark.parametrize("own_key_material", [False, True], ids=["grants-only", "owns-material"])
def test_an_application_role_shreds_only_if_it_owns_the_key_material_table(
    app_role: str, master_key: str, own_key_material: bool
) -> None:
    with own_schema("roles") as schema:
        url = f"{POSTGRES_URL}?schema={schema}"
        app = _app_service(url, schema, app_role, master_key, own_key_material)
        try:
            app.store_for_tenant("doomed", "s", "v")
            app.store_for_tenant("kept", "s", "v")
            doomed = wrapped_material(app, "doomed")

            if own_key_material:
                assert app.erase_tenant("doomed", confirm=True) == [1]
                assert [blob for blob in doomed if blob in stored_bytes(app)] == []
            else:
                with pytest.raises(ShredIncomplete, match="does not own"):
                    app.erase_tenant("doomed", confirm=True)
                with pytest.raises(DecryptionFailed):  # destroyed all the same
                    app.retrieve_for_tenant("doomed", "s")
                assert wrapped_material(app, "doomed") == []
                assert all(blob in stored_bytes(app) for blob in doomed)  # still in the pages
            assert app.retrieve_for_tenant("kept", "s").value == "v"
            # A rebuild (and a check) makes tables: the owner's job, not the application's,
            # and the error says so (it said only "permission denied for schema ...").
            for call in (app.rebuild_read_models, app.check_read_models):
                with pytest.raises(StorageError, match="run it as the tables' owner") as raised:
                    call()
                assert "permission denied" in str(raised.value)
            owner = SecretService.create(url, master_key=master_key)
            try:
                owner.rebuild_read_models()
            finally:
                owner.close()
            assert [info.name for info in app.list_for_tenant("kept")] == ["s"]
            assert app.retrieve_for_tenant("kept", "s").access_count == 2  # counts kept
            app.store_for_tenant("kept", "t", "w")  # the rebuilt tables take writes too
        finally:
            app.close()


@pytest.mark.parametrize("on_disk", ["sqlite"], indirect=True)
def test_a_shred_waiting_for_a_reader_lets_writers_go_on(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each checkpoint try runs without a busy handler: between tries the write lock is
    free, so a writer with a short lock timeout is not starved by a waiting shred."""
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 3.0)
    eraser = make_service()  # the default 30 s lock timeout: no bound on its own waits
    writer = make_service(settings=KeyledgerSettings(lock_timeout_seconds=1))
    eraser.store_for_tenant("doomed", "s", "v")
    reader = sqlite3.connect(str(eraser._ledger.env.get("SQLITE_DBNAME")))
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM kl_key_material").fetchone()
    outcome: list[BaseException | None] = []

    def erase() -> None:
        try:
            eraser.erase_tenant("doomed", confirm=True)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=erase)
    thread.start()
    try:
        time.sleep(0.5)  # the erasure is committed; its shred is waiting for the reader
        for i in range(5):
            writer.store_for_tenant("kept", f"s{i}", "v")  # each within its 1 s timeout
    finally:
        thread.join(timeout=30)
        reader.rollback()
        reader.close()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ShredIncomplete)
    assert [info.name for info in writer.list_for_tenant("kept")] == [f"s{i}" for i in range(5)]


@pytest.mark.postgres
@pytest.mark.parametrize("on_disk", ["postgres"], indirect=True)
def test_a_snapshot_open_elsewhere_makes_the_postgresql_shred_incomplete(
    service: SecretService, master_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VACUUM FULL copies row versions that an open snapshot may still see into the new
    file; its VERBOSE report says so, and keyledger raises instead of claiming success
    once its patience is over."""
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 0.2)
    service.store_for_tenant("doomed", "s", "v")
    service.store_for_tenant("kept", "s", "v")
    doomed = wrapped_material(service, "doomed")
    with psycopg.connect(POSTGRES_URL, autocommit=True) as other:
        other.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        other.execute("SELECT 1").fetchone()  # takes its snapshot now

        with pytest.raises(ShredIncomplete, match="transaction open elsewhere"):
            service.erase_tenant("doomed", confirm=True)

        assert wrapped_material(service, "doomed") == []  # deleted, in force
        assert all(blob in stored_bytes(service) for blob in doomed)  # still in the file
        other.execute("ROLLBACK")
    service.shred_key_material()
    assert [blob for blob in doomed if blob in stored_bytes(service)] == []


@pytest.mark.postgres
def test_an_application_role_that_may_not_set_lc_messages_still_sees_kept_rows(
    app_role: str, master_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role that is no superuser may not set lc_messages (the server refuses it): the
    shred reads VACUUM FULL's report by the routine that sent it, and still finds the
    rows a snapshot open elsewhere kept."""
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 0.2)
    with own_schema("roles") as schema:
        app = _app_service(f"{POSTGRES_URL}?schema={schema}", schema, app_role, master_key, True)
        try:
            with (
                psycopg.connect(_as_role(POSTGRES_URL, app_role), autocommit=True) as conn,
                pytest.raises(psycopg.errors.InsufficientPrivilege),
            ):
                conn.execute("SET lc_messages TO 'C'")
            app.store_for_tenant("doomed", "s", "v")
            app.store_for_tenant("kept", "s", "v")
            doomed = wrapped_material(app, "doomed")
            end_snapshot = open_snapshot(app)
            try:
                with pytest.raises(ShredIncomplete, match="transaction open elsewhere"):
                    app.erase_tenant("doomed", confirm=True)
                assert all(blob in stored_bytes(app) for blob in doomed)
            finally:
                end_snapshot()
            app.shred_key_material()
            assert [blob for blob in doomed if blob in stored_bytes(app)] == []
        finally:
            app.close()


@pytest.mark.postgres
@pytest.mark.parametrize("on_disk", ["postgres"], indirect=True)
def test_a_vacuum_report_that_cannot_be_read_makes_the_shred_incomplete(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether VACUUM FULL kept rows is known only from its report: one that cannot be
    read (tests/unit/test_pg_vacuum_report.py has the forms) is not taken for "none
    kept", even with no snapshot open anywhere."""
    service.store_for_tenant("doomed", "s", "v")
    reports: list[list[ServerNotice]] = []

    def unreadable(notices: list[ServerNotice]) -> None:
        reports.append(list(notices))
        return

    monkeypatch.setattr(postgres_store, "kept_row_versions", unreadable)
    with pytest.raises(ShredIncomplete, match="could not be read"):
        service.erase_tenant("doomed", confirm=True)
    assert wrapped_material(service, "doomed") == []  # the deletion is in force
    [notices] = reports  # it was given the server's own report, read while it came
    assert [n for n in notices if n.source_function == REPORTING_ROUTINE and n.message_detail]
    with pytest.raises(DecryptionFailed):
        service.retrieve_for_tenant("doomed", "s")


@pytest.mark.parametrize(
    "on_disk", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_snapshot_that_ends_while_the_shred_waits_lets_it_finish(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's short read overlapping the erasure is the common case (a busy
    store always has one): the shred tries again while it lasts, on both stores."""
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 10.0)
    service.store_for_tenant("doomed", "s", "v")
    service.store_for_tenant("kept", "s", "v")
    doomed = wrapped_material(service, "doomed")
    end_snapshot = open_snapshot(service)
    timer = threading.Timer(0.5, end_snapshot)
    timer.start()
    try:
        service.erase_tenant("doomed", confirm=True)  # no ShredIncomplete
    finally:
        timer.join()
    assert [blob for blob in doomed if blob in stored_bytes(service)] == []
    assert service.retrieve_for_tenant("kept", "s").value == "v"


@pytest.mark.postgres
@pytest.mark.parametrize("on_disk", ["postgres"], indirect=True)
def test_the_postgresql_shred_rewrites_the_table_once_more_when_the_snapshot_ends(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rewrite locks the table against readers of key material: waiting for the
    snapshot to end is a look at pg_stat_activity, not another rewrite."""
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 10.0)
    recorder = service._ledger.recorder
    rewrites: list[int] = []
    rewrite = recorder._vacuum_key_material

    def counted() -> int:
        kept = rewrite()
        rewrites.append(kept)
        return kept

    monkeypatch.setattr(recorder, "_vacuum_key_material", counted)
    service.store_for_tenant("doomed", "s", "v")
    end_snapshot = open_snapshot(service)
    timer = threading.Timer(1.0, end_snapshot)
    timer.start()
    try:
        service.erase_tenant("doomed", confirm=True)
    finally:
        timer.join()

    assert 2 <= len(rewrites) <= 3  # the first, one a second while waiting, the last
    assert rewrites[0] > 0
    assert rewrites[-1] == 0


@pytest.mark.postgres
@pytest.mark.parametrize("on_disk", ["postgres"], indirect=True)
def test_a_snapshot_taken_after_the_deletion_does_not_hold_the_postgresql_shred(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only transactions older than the deletion can see its rows: one that began
    after it, and stays open, must not keep the shred from finishing."""
    service.store_for_tenant("doomed", "s", "v")
    doomed = wrapped_material(service, "doomed")
    older = open_snapshot(service)
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 0.2)
    with pytest.raises(ShredIncomplete):
        service.erase_tenant("doomed", confirm=True)  # the older snapshot sees the rows
    newer = open_snapshot(service)  # after the deletion: it does not see them
    monkeypatch.setattr(unit_writer, "SHRED_PATIENCE_SECONDS", 10.0)
    timer = threading.Timer(0.5, older)
    timer.start()
    try:
        service.shred_key_material()  # no ShredIncomplete, with the newer one still open
    finally:
        timer.join()
        newer()
    assert [blob for blob in doomed if blob in stored_bytes(service)] == []


def open_snapshot(service: SecretService) -> Callable[[], None]:
    """A transaction of another connection holding a snapshot taken now (it sees the key
    material as it is); the returned function ends it."""
    schema = service._ledger.env.get("POSTGRES_SCHEMA")
    if schema:
        pg = psycopg.connect(POSTGRES_URL, autocommit=True)
        pg.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        pg.execute("SELECT 1").fetchone()

        def end_pg() -> None:
            pg.execute("ROLLBACK")
            pg.close()

        return end_pg
    lite = sqlite3.connect(str(service._ledger.env.get("SQLITE_DBNAME")), check_same_thread=False)
    lite.execute("BEGIN")
    lite.execute("SELECT COUNT(*) FROM kl_key_material").fetchone()

    def end_sqlite() -> None:
        lite.rollback()
        lite.close()

    return end_sqlite


@pytest.mark.postgres
@pytest.mark.parametrize("on_disk", ["postgres"], indirect=True)
def test_a_shred_that_times_out_behind_a_lock_is_incomplete_not_a_storage_error(
    make_service: MakeService,
) -> None:
    """The erasure committed before the shred ran: a lock timeout in VACUUM FULL must not
    read as a StorageError ("nothing was written")."""
    service = make_service(settings=KeyledgerSettings(lock_timeout_seconds=1))
    service.store_for_tenant("doomed", "s", "v")
    schema = service._ledger.env.get("POSTGRES_SCHEMA")
    with psycopg.connect(POSTGRES_URL, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                sql.Identifier(str(schema), "kl_key_material")
            )
        )
        with pytest.raises(ShredIncomplete, match="could not be shredded") as raised:
            service.erase_tenant("doomed", confirm=True)
        other.execute("ROLLBACK")
    assert not isinstance(raised.value, StorageError)
    assert wrapped_material(service, "doomed") == []  # the erasure is in force
    with pytest.raises(DecryptionFailed):
        service.retrieve_for_tenant("doomed", "s")
