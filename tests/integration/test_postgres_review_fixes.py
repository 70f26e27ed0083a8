"""PostgreSQL failure paths found by review (0.11.0), each with its own schema."""

from __future__ import annotations

import resource
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conftest import POSTGRES_URL
from keyledger import SecretService, StorageError, tenant
from keyledger.application import read_models
from keyledger.infrastructure import postgres_store

pytestmark = pytest.mark.postgres


@pytest.fixture
def service(schema: str) -> Iterator[SecretService]:
    with SecretService.create(
        f"{POSTGRES_URL}?schema={schema}", master_key=secrets.token_hex(32)
    ) as opened:
        yield opened


def _admin(schema: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        POSTGRES_URL, autocommit=True, options=f"-csearch_path={schema}", connect_timeout=5
    )


@pytest.mark.parametrize(
    "weakening",
    [
        "ALTER TABLE keyledger_events ENABLE REPLICA TRIGGER kl_events_append_only",
        "CREATE OR REPLACE FUNCTION kl_refuse_event_change() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN RETURN OLD; END $$",
    ],
    ids=["trigger only for replication", "function lets rows through"],
)
def test_db_check_does_not_call_a_weakened_trigger_enforced(
    service: SecretService, schema: str, weakening: str
) -> None:
    with tenant("acme"):
        service.store("db", "v")
    assert service.check_schema().append_only_enforced
    with _admin(schema) as admin:
        admin.execute(weakening)
        deleted = admin.execute("DELETE FROM keyledger_events RETURNING 1").fetchall()
    assert deleted  # the weakening is real: rows can be deleted
    assert not service.check_schema().append_only_enforced


def test_a_write_whose_commit_answer_is_lost_is_settled_not_called_a_lock_timeout(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The BEGIN-first way (taken when a pooled connection has input pending) sends the
    rest of the write ending in COMMIT; if the answer is lost, the write may be in. It
    is looked up: here it committed, and the error says so (a retry would repeat it)."""
    with tenant("acme"):
        service.store("db", "v")
    recorder = service._ledger.recorder
    real = type(recorder)._unit_in_pipeline

    def committed_then_lost(self: Any, conn: Any, *args: Any, **kwargs: Any) -> Any:
        real(self, conn, *args, **kwargs)  # BEGIN ... COMMIT, all applied
        conn.close()  # the answer never arrives
        raise psycopg.OperationalError("consuming input failed: server closed the connection")

    monkeypatch.setattr(postgres_store, "_has_pending_input", lambda conn: True)
    monkeypatch.setattr(type(recorder), "_unit_in_pipeline", committed_then_lost)
    with tenant("acme"), pytest.raises(StorageError, match="after the write was committed"):
        service.rotate_key()
    monkeypatch.undo()
    with tenant("acme"):
        assert [(k.version, k.status) for k in service.list_keys()] == [
            (1, "retired"),
            (2, "active"),
        ]


def test_a_live_connection_past_descriptor_1023_still_writes_in_one_round_trip(
    schema: str,
) -> None:
    """select() refuses descriptors past 1023: every write then took the slow way."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit ({hard}) is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    padding = [open("/dev/null") for _ in range(1100)]  # noqa: SIM115 (closed below)
    try:
        with SecretService.create(
            f"{POSTGRES_URL}?schema={schema}", master_key=secrets.token_hex(32)
        ) as service:
            recorder = service._ledger.recorder
            with recorder._connection() as conn:
                assert conn.fileno() > 1023
                assert not postgres_store._has_pending_input(conn)
    finally:
        for handle in padding:
            handle.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_dropped_listen_connection_ends_the_wait_instead_of_failing(
    service: SecretService, schema: str
) -> None:
    """The worker waits on one LISTEN connection: one terminated by an administrator (or
    a restart) ends the wait; the next catch-up runs on a fresh connection."""
    outcome: list[BaseException | None] = []
    recorder: Any = service._ledger.recorder
    ours: list[int] = []  # this service's sessions: another run's LISTEN is not ours to end
    connection = recorder._connection

    @contextmanager
    def noting_sessions(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with connection(*args, **kwargs) as conn:
            ours.append(conn.info.backend_pid)
            yield conn

    vars(recorder)["_connection"] = noting_sessions

    def wait() -> None:
        try:
            service._ledger.wait_for_events(30)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    with _admin(schema) as admin:
        for _ in range(100):  # until the LISTEN is in place
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%%' "
                "AND datname = current_database() AND pid = ANY(%s)",
                (list(ours),),
            ).fetchall()
            if rows:
                break
            time.sleep(0.05)
        assert rows
        for (pid,) in rows:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    waiter.join(10)
    assert not waiter.is_alive()
    assert outcome == [None]
    with tenant("acme"):
        service.store("after", "v")  # the pool recovered
    assert service.catch_up_read_models() >= 1


def test_an_audit_model_whose_tracking_was_set_back_fails_with_storage_error(
    service: SecretService, schema: str
) -> None:
    with tenant("acme"):
        service.store("db", "v")
        service.get_audit_logs()  # caught up
        service.retrieve("db")
    with _admin(schema) as admin:
        admin.execute(sql.SQL("UPDATE kl_tracking SET position = 0"))
    with pytest.raises(StorageError, match="projections rebuild audit"):
        service.catch_up_read_models()
    service.rebuild_read_models()
    with tenant("acme"):
        assert [e.action for e in service.get_audit_logs()][:2] == ["read", "create"]


def test_a_worker_told_to_stop_leaves_after_the_page_it_applies(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read_models, "PAGE_SIZE", 2)
    with tenant("acme"):
        for index in range(5):
            service.store(f"s{index}", "v")
    applied = read_models.catch_up_audit(service._ledger, stop=lambda: True)
    assert applied == 2
    reached, head = read_models.audit_position(service._ledger)
    assert head - reached == 4  # 6 events (key, 5 secrets): one page of 2 applied


def _waiting_for_a_lock(schema: str) -> bool:
    with _admin(schema) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE NOT l.granted AND n.nspname = %s",
            (schema,),
        ).fetchone()
    return bool(row and row[0])


def _soon_waiting_for_a_lock(schema: str, seconds: float = 20) -> bool:
    """Whether a session of ``schema`` waits for a lock within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not _waiting_for_a_lock(schema):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_rebuilds_switch_waits_for_a_reader_of_the_key_inventory_without_deadlock(
    service: SecretService, schema: str
) -> None:
    """The key inventory and the drift diagnosis read kl_keys, then kl_catalog, in one
    transaction; the switch replaces both. It takes them in that same order, so a reader
    holding kl_keys finishes its transaction and the switch goes on after it."""
    service.store_for_tenant("acme", "s", "v")
    reader = psycopg.connect(POSTGRES_URL, options=f"-csearch_path={schema}", connect_timeout=5)
    outcome: dict[str, BaseException | None] = {}

    def rebuild() -> None:
        try:
            service.rebuild_read_models(names=["catalog"])
            outcome["rebuild"] = None
        except BaseException as error:
            outcome["rebuild"] = error

    try:
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        reader.execute("SELECT count(*) FROM kl_keys").fetchone()
        rebuilding = threading.Thread(target=rebuild)
        rebuilding.start()
        assert _soon_waiting_for_a_lock(schema), "the switch never waited for the reader"
        time.sleep(0.2)
        counted = reader.execute("SELECT count(*) FROM kl_catalog").fetchone()
        reader.commit()
    finally:
        reader.close()
    rebuilding.join(30)

    assert counted == (1,)
    assert outcome == {"rebuild": None}
    assert [s.name for s in service.list_for_tenant("acme")] == ["s"]


def test_a_read_that_overlaps_a_rebuilds_switch_sees_the_read_models_whole(
    service: SecretService, schema: str
) -> None:
    """A drift diagnosis reads the stream, then kl_keys and kl_catalog, in one snapshot.
    A switch committed between its first statement and its read of kl_keys left it a
    renamed-in kl_keys with no row visible (false drift). Reads now lock the read models
    before their snapshot: the switch waits for the diagnosis, which sees the old tables."""
    for i in range(5):
        service.store_for_tenant("acme", f"s{i}", "v")
    service.rotate_key_for_tenant("acme")
    paused, resume = threading.Event(), threading.Event()
    real_execute = postgres_store.PgCursor.execute

    def execute(self: Any, statement: str, params: Any = ()) -> Any:
        done = real_execute(self, statement, params)
        if (
            threading.current_thread().name == "diagnosis"
            and "MAX(originator_version)" in statement
        ):
            paused.set()
            resume.wait(20)
        return done

    outcome: dict[str, Any] = {}

    def diagnose() -> None:
        outcome["report"] = service.diagnose_tenant_secret_key_drift("acme")

    def rebuild() -> None:
        try:
            outcome["rebuilt"] = service.rebuild_read_models(names=["catalog", "keys"])
        except BaseException as error:
            outcome["rebuilt"] = error

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(postgres_store.PgCursor, "execute", execute)
        diagnosis = threading.Thread(target=diagnose, name="diagnosis")
        diagnosis.start()
        assert paused.wait(20)
        rebuilding = threading.Thread(target=rebuild)
        rebuilding.start()
        assert _soon_waiting_for_a_lock(schema), "the switch did not wait for the read"
        resume.set()
        diagnosis.join(30)
        rebuilding.join(30)

    assert outcome["report"].ok, outcome["report"].issues
    assert isinstance(outcome["rebuilt"], int)
    assert service.diagnose_tenant_secret_key_drift("acme").ok
