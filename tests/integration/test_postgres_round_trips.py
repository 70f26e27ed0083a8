"""PostgreSQL writes in one round trip, and what makes that safe.

A lone read is one call of ``kl_append_read_v1``, a batch of reads one call of
``kl_append_reads_v1``, and every other write unit is one pipeline (its implicit
transaction), headed by ``kl_append_unit_v1`` (lock, notification, version check and the
append, on the server).
They must write exactly what the stepwise transactions write, refuse stale decisions
without writing anything, survive a connection that dies before they are sent (written
once, elsewhere), fail closed when the answer is lost after the commit, and
without the functions (a schema made by an older version) only slow down, be reported by
``db check`` and be repaired by ``db init``."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError
from psycopg import sql

from conftest import POSTGRES_URL, own_schema
from keyledger import SecretService, StorageError, super_admin
from keyledger.context import make_actor
from keyledger.domain.secret import Secret
from keyledger.infrastructure import pg_functions
from keyledger.infrastructure.pg_arrays import bytea_array, int8_array, text_array, uuid_array
from keyledger.infrastructure.pg_functions import (
    APPEND_READ_FUNCTION,
    APPEND_READS_FUNCTION,
    APPEND_UNIT_FUNCTION,
    BEGIN_WRITE_FUNCTION,
    SMALL_BATCH,
    STORE_CREATED_FUNCTION,
)
from keyledger.infrastructure.postgres_store import KeyledgerPostgresRecorder
from keyledger.infrastructure.write_unit import StaleStateError, WriteUnit

pytestmark = pytest.mark.postgres

TENANT = "tenant-a"
ACTOR = {"user_id": "alice", "ip_address": None, "user_agent": None}


@pytest.fixture
def service(schema: str) -> Iterator[SecretService]:
    with SecretService.create(
        f"{POSTGRES_URL}?schema={schema}", master_key=secrets.token_hex(32)
    ) as opened:
        opened.store_for_tenant(TENANT, "api-key", "value-a", user_id="alice")
        yield opened


def _recorder(service: SecretService) -> KeyledgerPostgresRecorder:
    store = service._ledger.store
    assert isinstance(store, KeyledgerPostgresRecorder)
    return store


def _events(schema: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        return conn.execute(
            sql.SQL("SELECT notification_id, originator_id, state FROM {} ORDER BY 1").format(
                sql.Identifier(schema, "keyledger_events")
            )
        ).fetchall()


def _disabling(service: SecretService) -> tuple[Any, list[Any], list[Any]]:
    """The cached "api-key" secret, and the events (and their stored form) that would
    disable it: a write unit to send by hand."""
    ledger = service._ledger
    secret = ledger.secret(TENANT, "api-key")
    assert secret is not None
    changed = ledger.for_update(secret)
    changed.disable(ACTOR)
    events = changed.collect_events()
    return secret, events, [ledger.mapper.to_stored_event(e) for e in events]


def _drop_functions(schema: str, *names: str) -> None:
    """Make the schema look like one made by an older version."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP FUNCTION {}").format(sql.Identifier(schema, name)))


def test_lone_retrieves_are_written_by_the_single_read_function_with_counts_and_positions(
    service: SecretService, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _recorder(service)
    calls: list[int] = []
    original = recorder._call_append_read

    def counting(conn: Any, read: Any) -> bool:
        calls.append(1)
        return original(conn, read)

    monkeypatch.setattr(recorder, "_call_append_read", counting)
    before = _events(schema)

    counts = [
        service.retrieve_for_tenant(TENANT, "api-key", user_id="bob").access_count for _ in range(5)
    ]

    assert counts == [1, 2, 3, 4, 5]
    assert calls == [1] * 5
    after = _events(schema)
    assert len(after) == len(before) + 5
    with super_admin():
        reads = [e for e in service.get_audit_logs(tenant_id=TENANT) if e.action == "read"]
    assert [entry.position for entry in reads] == [row[0] for row in after[-5:]][::-1]
    assert {entry.user_id for entry in reads} == {"bob"}


def test_a_stale_decision_writes_nothing_and_the_read_is_decided_again(
    service: SecretService, schema: str
) -> None:
    recorder, ledger = _recorder(service), service._ledger
    secret = ledger.secret(TENANT, "api-key")
    assert secret is not None
    stale = ledger.reads.read(
        TENANT, "api-key", 1, 1, ACTOR, expected={secret.id: secret.version + 1}
    )
    before = _events(schema)

    with recorder._connection() as conn:
        assert recorder._call_append_reads(conn, [stale]) is False
        assert recorder._call_append_read(conn, stale) is False

    assert _events(schema) == before
    assert stale.position is None
    assert stale.access_count is None
    # Through the whole path: the batch is refused, written item by item, the stale one fails.
    fresh = ledger.reads.read(TENANT, "api-key", 1, 1, ACTOR, expected={secret.id: secret.version})
    stale_again = ledger.reads.read(
        TENANT, "api-key", 1, 1, ACTOR, expected={secret.id: secret.version + 1}
    )
    errors = recorder.insert_reads([fresh, stale_again])
    assert errors[0] is None
    assert errors[1] is not None
    assert fresh.access_count == 1
    assert len(_events(schema)) == len(before) + 1


@pytest.mark.parametrize("size", [2, SMALL_BATCH, SMALL_BATCH + 1, 8])
def test_a_batch_of_reads_is_written_alike_one_statement_per_read_or_set_based(
    service: SecretService, schema: str, size: int
) -> None:
    """Batches up to SMALL_BATCH are written with a statement per read, larger ones with
    set-based statements: the same events in the given order, the same counts, and the
    same refusal of a stale decision."""
    recorder, ledger = _recorder(service), service._ledger
    names = [f"secret-{k}" for k in range(size - 1)] + ["secret-0"]  # one name read twice
    for name in sorted(set(names)):
        service.store_for_tenant(TENANT, name, "value")
    keyring = ledger.keyring(TENANT)
    assert keyring is not None

    def reads(stale_index: int | None) -> list[Any]:
        batch = []
        for k, name in enumerate(names):
            secret = ledger.secret(TENANT, name)
            assert secret is not None
            version = secret.version + (1 if k == stale_index else 0)
            expected = {secret.id: version, keyring.id: keyring.version}
            batch.append(ledger.reads.read(TENANT, name, 1, 1, ACTOR, expected=expected))
        return batch

    before = _events(schema)
    with recorder._connection() as conn:
        assert recorder._call_append_reads(conn, reads(stale_index=size - 1)) is False
        assert _events(schema) == before  # a stale decision: nothing written
        batch = reads(stale_index=None)
        assert recorder._call_append_reads(conn, batch) is True

    written = _events(schema)[len(before) :]
    assert [row[0] for row in written] == [read.position for read in batch]
    assert [uuid.UUID(str(row[1])) for row in written] == [
        uuid.UUID(str(read.stored.originator_id)) for read in batch
    ]
    counts = {info.name: info.access_count for info in service.list_for_tenant(TENANT)}
    assert counts["secret-0"] == 2
    assert all(counts[name] == 1 for name in names[1:-1])
    # Each reader gets the count one-by-one application gives: secret-0's first read 1.
    assert [read.access_count for read in batch] == [1] * (size - 1) + [2]


def _with_reads_written(small_batch: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """In a schema of its own, whose batch function takes the loop up to ``small_batch``
    reads: one batch of reads (two tenants, a name read twice, a name with no catalog row,
    then a stale batch); what the call returned and the catalog it left."""
    with (
        own_schema("paths") as schema,
        SecretService.create(
            f"{POSTGRES_URL}?schema={schema}", master_key=secrets.token_hex(32)
        ) as service,
    ):
        recorder, ledger = _recorder(service), service._ledger
        with monkeypatch.context() as patched:
            patched.setattr(pg_functions, "SMALL_BATCH", small_batch)
            statement = pg_functions.append_reads_statement(
                recorder.events_table_name, recorder.channel_name
            )
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            conn.execute(statement)
        wanted = [("t1", "a"), ("t1", "b"), ("t2", "a"), ("t1", "a")]
        for tenant_id, name in sorted(set(wanted)):
            service.store_for_tenant(tenant_id, name, "value")

        def read(tenant_id: str, name: str, *, stale: bool = False) -> Any:
            keyring = ledger.keyring(tenant_id)
            assert keyring is not None
            secret = ledger.secret(tenant_id, name)
            expected = {keyring.id: keyring.version + (1 if stale else 0)}
            if secret is not None:
                expected[secret.id] = secret.version
            return ledger.reads.read(tenant_id, name, 1, 1, ACTOR, expected=expected, timestamp=AT)

        batch = [read(t, n) for t, n in wanted] + [read("t2", "no-row")]
        with recorder._connection() as conn:
            refused = recorder._call_append_reads(conn, [read("t1", "b", stale=True)])
            written = recorder._call_append_reads(conn, batch)
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            catalog = conn.execute(
                sql.SQL(
                    "SELECT tenant_id, name, access_count, last_accessed_at FROM {} ORDER BY 1, 2"
                ).format(sql.Identifier(schema, "kl_catalog"))
            ).fetchall()
        first = _events(schema)[0][0]
        return {
            "refused": refused,
            "written": written,
            "positions": [read.position - first for read in batch],
            "counts": [(read.access_count, read.last_accessed_at) for read in batch],
            "catalog": catalog,
        }


AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_both_ways_of_writing_a_batch_of_reads_give_the_same_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch function's loop (a few reads) and its set-based statements (more) are
    interchangeable: each forced on a batch of five, the outcomes are equal."""
    loop = _with_reads_written(8, monkeypatch)
    set_based = _with_reads_written(0, monkeypatch)

    assert loop == set_based
    assert loop["refused"] is False
    assert loop["written"] is True
    counts = [count for count, _ in loop["counts"]]
    assert counts == [1, 1, 1, 2, None]  # t1/a read twice; no catalog row: no count
    assert [row[2] for row in loop["catalog"]] == [2, 1, 1]


def test_without_the_function_reads_still_work_and_db_check_and_init_say_and_repair_it(
    service: SecretService, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    _drop_functions(schema, APPEND_READ_FUNCTION, APPEND_READS_FUNCTION)
    assert f"function {APPEND_READ_FUNCTION}()" in service.check_schema().missing
    assert f"function {APPEND_READS_FUNCTION}()" in service.check_schema().missing
    assert not service.check_schema().ok

    with caplog.at_level(logging.WARNING):
        values = [service.retrieve_for_tenant(TENANT, "api-key").value for _ in range(3)]

    assert values == ["value-a"] * 3
    assert service.retrieve_for_tenant(TENANT, "api-key").access_count == 4
    assert any("db init" in record.getMessage() for record in caplog.records)
    assert _recorder(service)._append_function is False

    status = service.init_schema()
    assert status.ok
    assert status.missing == []
    with SecretService.create(f"{POSTGRES_URL}?schema={schema}", master_key=None) as reopened:
        assert reopened.check_schema().ok


def test_functions_of_an_older_version_are_reported_outdated_and_replaced_by_db_init(
    service: SecretService, schema: str
) -> None:
    """0.9.0's functions ran without generic plans; an edited body is outdated too."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"ALTER FUNCTION {schema}.{APPEND_READS_FUNCTION} RESET plan_cache_mode")
        conn.execute(
            f"CREATE OR REPLACE FUNCTION {schema}.{STORE_CREATED_FUNCTION}"
            f"({', '.join(_arguments(conn, schema, STORE_CREATED_FUNCTION))}) "
            "LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan "
            "AS $fn$ BEGIN RAISE EXCEPTION 'old'; END $fn$"
        )

    status = service.check_schema()

    assert status.missing == [
        f"function {APPEND_READS_FUNCTION}() (current definition)",
        f"function {STORE_CREATED_FUNCTION}() (current definition)",
    ]
    assert not status.ok
    assert service.init_schema().missing == []
    assert service.check_schema().ok
    service.store_for_tenant(TENANT, "fresh", "value")  # the replaced function works
    assert service.retrieve_for_tenant(TENANT, "fresh").value == "value"


def _arguments(conn: psycopg.Connection[Any], schema: str, name: str) -> list[str]:
    row = conn.execute(
        "SELECT pg_get_function_arguments(p.oid) FROM pg_proc p JOIN pg_namespace n "
        "ON n.oid = p.pronamespace WHERE n.nspname = %s AND p.proname = %s",
        (schema, name),
    ).fetchone()
    assert row is not None
    return [str(row[0])]


@pytest.mark.parametrize(
    ("pack", "values"),
    [
        (uuid_array, []),
        (uuid_array, [uuid.uuid4() for _ in range(3)]),
        (int8_array, [0, -1, 2**63 - 1, -(2**63), 42]),
        (text_array, ["", "t-1", "caf\u00e9 \u4e2d\u6587", "x" * 5000]),
        (bytea_array, [b"", b"\x00\xff\x00", bytes(range(256)) * 20]),
        (int8_array, []),
    ],
    ids=["uuid-empty", "uuid", "int8", "text", "bytea", "int8-empty"],
)
@pytest.mark.usefixtures("_postgres_server")
def test_packed_arrays_reach_the_server_as_the_values_they_were_made_of(
    pack: Any, values: list[Any]
) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        row = conn.execute("SELECT %b, cardinality(%b)", (pack(values), pack(values))).fetchone()
    assert row is not None
    assert row[0] == values
    assert row[1] == len(values)


def _dying_first(original: Callable[..., Any], killed: list[int]) -> Callable[..., Any]:
    """``original`` (a recorder method taking the connection first), the first call that
    sends on its own (not after a BEGIN) finding its connection killed; noted in
    ``killed``."""

    def die_first(conn: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("begin", True) and not killed:
            killed.append(conn.info.backend_pid)
            _kill(conn.info.backend_pid)
        return original(conn, *args, **kwargs)

    return die_first


def _losing_the_answer(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original``, its connection killed after it committed: the answer is lost."""

    def lose_the_answer(conn: Any, *args: Any, **kwargs: Any) -> Any:
        original(conn, *args, **kwargs)
        _kill(conn.info.backend_pid)
        conn.execute("SELECT 1")  # the dead connection raises OperationalError
        raise AssertionError("unreachable")

    return lose_the_answer


def _kill(backend_pid: int) -> None:
    """Terminate one backend and wait until it is gone."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
        for _ in range(200):
            if not admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend_pid,)
            ).fetchone():
                return
            time.sleep(0.01)


# The two one-call read paths: a lone read (the single-read function) and a batch (the
# batch function, which lone reads take too when the single-read function is missing).
READ_CALLS = ["_call_append_read", "_call_append_reads"]


def _read_call(
    recorder: KeyledgerPostgresRecorder, name: str, monkeypatch: pytest.MonkeyPatch
) -> Any:
    if name == "_call_append_reads":
        monkeypatch.setattr(recorder, "_single_read_function", False)
    return getattr(recorder, name)


@pytest.mark.parametrize("call", READ_CALLS)
def test_a_connection_that_dies_before_the_call_is_replaced_and_the_read_succeeds(
    service: SecretService, schema: str, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """The race the liveness check cannot close: the server terminates the connection
    after the check. No event of the batch exists, so it is written again elsewhere."""
    recorder = _recorder(service)
    original = _read_call(recorder, call, monkeypatch)
    killed: list[int] = []
    monkeypatch.setattr(recorder, call, _dying_first(original, killed))
    before = len(_events(schema))

    secret = service.retrieve_for_tenant(TENANT, "api-key", user_id="bob")

    assert killed
    assert secret.value == "value-a"
    assert secret.access_count == 1
    assert len(_events(schema)) == before + 1  # recorded once, not twice


@pytest.mark.parametrize("call", READ_CALLS)
def test_a_connection_lost_after_the_server_recorded_the_reads_fails_closed(
    service: SecretService, schema: str, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """The answer is lost after the commit: the read is in the log, the value is not
    returned, and nothing is written twice."""
    recorder = _recorder(service)
    original = _read_call(recorder, call, monkeypatch)

    monkeypatch.setattr(recorder, call, _losing_the_answer(original))
    before = len(_events(schema))

    with pytest.raises(StorageError, match="recorded"):
        service.retrieve_for_tenant(TENANT, "api-key", user_id="bob")

    assert len(_events(schema)) == before + 1
    monkeypatch.setattr(recorder, call, original)
    assert service.retrieve_for_tenant(TENANT, "api-key").access_count == 2


def test_without_the_single_read_function_lone_reads_go_through_the_batch_function(
    service: SecretService, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    _drop_functions(schema, APPEND_READ_FUNCTION)
    before = len(_events(schema))

    with caplog.at_level(logging.WARNING):
        counts = [service.retrieve_for_tenant(TENANT, "api-key").access_count for _ in range(3)]

    assert counts == [1, 2, 3]
    assert len(_events(schema)) == before + 3
    recorder = _recorder(service)
    assert recorder._single_read_function is False
    assert recorder._append_function is True  # the batch function took over
    assert sum("db init" in record.getMessage() for record in caplog.records) == 1
    assert service.init_schema().ok


@pytest.mark.parametrize(
    ("dropped", "unit_function", "unit_pipeline"),
    [
        ((APPEND_UNIT_FUNCTION,), False, True),  # a schema made by 0.4.0
        ((APPEND_UNIT_FUNCTION, BEGIN_WRITE_FUNCTION), False, False),  # by 0.3.0
    ],
    ids=["0.4.0-schema", "0.3.0-schema"],
)
def test_without_the_unit_functions_writes_still_work_and_db_init_restores_them(
    service: SecretService,
    schema: str,
    caplog: pytest.LogCaptureFixture,
    dropped: tuple[str, ...],
    unit_function: bool,
    unit_pipeline: bool,
) -> None:
    _drop_functions(schema, *dropped)
    missing = service.check_schema().missing
    assert all(f"function {name}()" in missing for name in dropped)
    before = len(_events(schema))

    with caplog.at_level(logging.WARNING):
        service.store_for_tenant(TENANT, "api-key", "value-b")  # an update: versions checked
        service.store_for_tenant(TENANT, "other", "value-c")  # a new secret
        service.rotate_key_for_tenant(TENANT)  # two aggregates, key material
        service.store_for_tenant(TENANT, "third", "value-d")

    recorder = _recorder(service)
    assert (recorder._unit_function, recorder._unit_pipeline) == (unit_function, unit_pipeline)
    assert len(_events(schema)) == before + 4  # each write once: the failed tries wrote nothing
    assert service.retrieve_for_tenant(TENANT, "api-key").value == "value-b"
    assert service.retrieve_for_tenant(TENANT, "other").value == "value-c"
    assert service.retrieve_for_tenant(TENANT, "third").key_version == 2
    assert sum("db init" in record.getMessage() for record in caplog.records) == len(dropped)
    assert service.init_schema().ok


def test_a_stale_write_unit_aborts_on_the_server_and_writes_nothing(
    service: SecretService, schema: str
) -> None:
    ledger = service._ledger
    before = _events(schema)

    secret, events, stored = _disabling(service)
    unit = WriteUnit(expected={secret.id: secret.version + 5}, domain_events=list(events))
    with pytest.raises(StaleStateError):
        ledger.store.insert_events(stored, unit=unit)

    assert _events(schema) == before
    assert [info.status for info in service.list_for_tenant(TENANT)] == ["active"]


# The two one-round-trip ways a unit is written: the generic pipeline (a disable goes
# that way) and a store function (an update of a value). Each: the recorder's method that
# sends it, the write, and what the write leaves to read back.
WAYS = {
    "pipeline": (
        "_unit_in_pipeline",
        lambda service: service.change_for_tenant(TENANT, "api-key", "disable", make_actor("x")),
        lambda service: service.list_for_tenant(TENANT, status="disabled")[0].name,
        "api-key",
    ),
    "store function": (
        "_call_store",
        lambda service: service.store_for_tenant(TENANT, "api-key", "value-b"),
        lambda service: service.retrieve_for_tenant(TENANT, "api-key").value,
        "value-b",
    ),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_a_write_whose_connection_dies_before_it_is_sent_is_written_once_elsewhere(
    service: SecretService, schema: str, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    method, write, read_back, expected = WAYS[way]
    recorder = _recorder(service)
    original = getattr(recorder, method)
    killed: list[int] = []
    monkeypatch.setattr(recorder, method, _dying_first(original, killed))
    before = len(_events(schema))

    write(service)

    assert killed
    assert len(_events(schema)) == before + 1
    assert read_back(service) == expected


@pytest.mark.parametrize("way", list(WAYS))
def test_a_write_whose_answer_is_lost_after_its_commit_fails_and_is_not_written_twice(
    service: SecretService, schema: str, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    method, write, read_back, expected = WAYS[way]
    recorder = _recorder(service)
    original = getattr(recorder, method)

    monkeypatch.setattr(recorder, method, _losing_the_answer(original))
    before = len(_events(schema))

    with pytest.raises(StorageError, match="committed"):
        write(service)

    assert len(_events(schema)) == before + 1
    monkeypatch.setattr(recorder, method, original)
    assert read_back(service) == expected


@pytest.mark.parametrize("order", ["stale first", "stale last"])
def test_reads_of_one_secret_decided_on_different_versions_are_each_checked(
    service: SecretService, schema: str, order: str
) -> None:
    """Two reads in one batch may hold different versions of the same secret (one thread
    decided before a change, the other after): the server must check both."""
    recorder, ledger = _recorder(service), service._ledger
    service.store_for_tenant(TENANT, "api-key", "value-b")  # the secret moves to version 2
    secret = ledger.secret(TENANT, "api-key")
    assert secret is not None
    keyring = ledger.keyring(TENANT)
    assert keyring is not None

    def read(version: int) -> Any:
        return ledger.reads.read(
            TENANT,
            "api-key",
            1,
            1,
            ACTOR,
            expected={secret.id: version, keyring.id: keyring.version},
        )

    stale, fresh = read(secret.version - 1), read(secret.version)
    batch = [stale, fresh] if order == "stale first" else [fresh, stale]
    before = len(_events(schema))

    errors = recorder.insert_reads(batch)

    outcome = dict(
        zip(
            ("stale", "fresh") if order == "stale first" else ("fresh", "stale"),
            errors,
            strict=True,
        )
    )
    assert isinstance(outcome["stale"], StaleStateError)
    assert outcome["fresh"] is None
    assert len(_events(schema)) == before + 1
    assert fresh.access_count == 1


def test_the_server_process_of_a_lost_connection_is_ended_before_anything_is_looked_up(
    service: SecretService,
) -> None:
    recorder = _recorder(service)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as other:
        pid = other.info.backend_pid
        assert recorder._backend_gone(pid)
        with pytest.raises(psycopg.OperationalError):
            other.execute("SELECT 1")
    assert recorder._backend_gone(2**31 - 7)  # no such process: nothing to wait for


def test_prepared_pipeline_statements_survive_pipelines_the_server_aborted(schema: str) -> None:
    """Write pipelines let psycopg prepare their statements after a few uses. A pipeline
    the server aborts halfway (a stale decision, an append that collides) skips every
    statement after the failure, PREPAREs included: later writes on the same connection
    must still find every statement they use (none "does not exist")."""
    url = f"{POSTGRES_URL}?schema={schema}&pool_size=1&max_overflow=0"
    with SecretService.create(url, master_key=secrets.token_hex(32)) as service:
        ledger = service._ledger
        service.store_for_tenant(TENANT, "api-key", "v0")
        for turn in range(3):
            for i in range(7):  # past psycopg's threshold of five uses: prepared
                service.store_for_tenant(TENANT, f"s{turn}-{i}", f"v{turn}-{i}")
                service.store_for_tenant(TENANT, "api-key", f"v{turn}-{i}")
            secret, events, stored = _disabling(service)
            stale = WriteUnit(expected={secret.id: secret.version + 5}, domain_events=events)
            with pytest.raises(StaleStateError):  # aborted by kl_append_unit_v1
                ledger.store.insert_events(stored, unit=stale)
            collides = WriteUnit(expected={secret.id: secret.version - 1}, domain_events=events)
            with pytest.raises(StaleStateError):  # aborted by the same check, one step later
                ledger.store.insert_events(stored, unit=collides)
            ledger.store.insert_events(stored, unit=WriteUnit(domain_events=events))
            with pytest.raises(IntegrityError):  # the same append again: aborted by it
                ledger.store.insert_events(stored, unit=WriteUnit(domain_events=events))
            assert service.change_for_tenant(TENANT, "api-key", "enable", make_actor("x"))
        names = [f"s{turn}-{i}" for turn in range(3) for i in range(7)]
        assert [service.retrieve_for_tenant(TENANT, n).value for n in names] == [
            f"v{turn}-{i}" for turn in range(3) for i in range(7)
        ]
        assert service.retrieve_for_tenant(TENANT, "api-key").value == "v2-6"
        assert service.list_for_tenant(TENANT, limit=100)[0].status == "active"


def _catalog(schema: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        return conn.execute(
            sql.SQL("SELECT * FROM {} ORDER BY tenant_id, name").format(
                sql.Identifier(schema, "kl_catalog")
            )
        ).fetchall()


def test_a_store_is_one_call_and_writes_what_the_generic_pipeline_writes(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stores through ``kl_store_created_v1`` and ``kl_store_updated_v1`` (new names,
    updates, a revived name) and through the generic unit pipeline (the functions turned
    off) leave the same events and catalog rows, and return the same counts."""
    options: list[dict[str, Any]] = [
        {},
        {"category": "db", "description": "d\u00e9", "metadata": {"k": "v", "a": "b"}},
        {"expires_at": datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)},
    ]
    catalogs, states, counts = [], [], []
    for use_function in (True, False):
        with (
            own_schema("stores") as each,
            SecretService.create(
                f"{POSTGRES_URL}?schema={each}", master_key=secrets.token_hex(32)
            ) as service,
        ):
            service.store_for_tenant(TENANT, "first", "v")  # the keyring's events
            recorder = _recorder(service)
            recorder._created_function = recorder._updated_function = use_function
            calls: list[int | None] = []

            def counting(
                *args: Any, _original: Any = recorder._call_store, _calls: Any = calls
            ) -> Any:
                position = _original(*args)
                _calls.append(position)
                return position

            monkeypatch.setattr(recorder, "_call_store", counting)
            infos = [
                service.store_for_tenant(TENANT, f"s{i}", f"v{i}", **extra)
                for i, extra in enumerate(options)
            ]
            for i in range(3):
                service.retrieve_for_tenant(TENANT, f"s{i}")
            infos.append(service.store_for_tenant(TENANT, "s0", "w0", category="new"))
            infos.append(service.store_for_tenant(TENANT, "s2", "w2", clear_expiry=True))
            service.change_for_tenant(TENANT, "s1", "delete", make_actor("x"))
            infos.append(service.store_for_tenant(TENANT, "s1", "revived"))
            # Each written by a function (a position), not handed on to the pipeline.
            assert len(calls) == (6 if use_function else 0)
            assert all(isinstance(position, int) for position in calls)
            counts.append([(info.version, info.access_count) for info in infos])
            values = [service.retrieve_for_tenant(TENANT, f"s{i}").value for i in range(3)]
            assert values == ["w0", "revived", "w2"]
            # Every column but the secret's id and its times.
            catalogs.append([row[1:13] + row[15:16] for row in _catalog(each)])
            states.append(len(_events(each)))
    assert counts[0] == counts[1] == [(1, 0), (1, 0), (1, 0), (2, 1), (2, 1), (2, 0)]
    assert catalogs[0] == catalogs[1]
    assert states[0] == states[1]


def test_a_new_secret_decided_on_a_stale_keyring_writes_nothing(
    service: SecretService, schema: str
) -> None:
    ledger, recorder = service._ledger, _recorder(service)
    keyring = ledger.keyring(TENANT)
    assert keyring is not None
    secret = Secret.create(
        tenant_id=TENANT,
        name="new-one",
        envelope=b"\x01" * 40,
        key_version=1,
        category=None,
        description=None,
        metadata={},
        expires_at=None,
        actor=ACTOR,
    )
    events = secret.collect_events()
    stored = [ledger.mapper.to_stored_event(e) for e in events]
    before, catalog = _events(schema), _catalog(schema)

    stale = WriteUnit(expected={keyring.id: keyring.version + 1}, domain_events=events)
    with pytest.raises(StaleStateError):
        recorder.insert_events(stored, unit=stale)

    assert _events(schema) == before
    assert _catalog(schema) == catalog
    fresh = WriteUnit(expected={keyring.id: keyring.version}, domain_events=events)
    assert len(recorder.insert_events(stored, unit=fresh) or []) == 1
    assert len(_catalog(schema)) == len(catalog) + 1
    with pytest.raises(IntegrityError):  # the same name again: the events' primary key
        recorder.insert_events(stored, unit=fresh)


def test_without_the_store_created_function_new_secrets_take_the_pipeline(
    service: SecretService, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    _drop_functions(schema, STORE_CREATED_FUNCTION)
    assert f"function {STORE_CREATED_FUNCTION}()" in service.check_schema().missing

    with caplog.at_level(logging.WARNING):
        for i in range(3):
            service.store_for_tenant(TENANT, f"n{i}", f"v{i}")

    recorder = _recorder(service)
    assert (recorder._created_function, recorder._updated_function) == (False, True)
    assert [service.retrieve_for_tenant(TENANT, f"n{i}").value for i in range(3)] == [
        "v0",
        "v1",
        "v2",
    ]
    assert sum("db init" in record.getMessage() for record in caplog.records) == 1
    assert service.init_schema().ok


class _Interrupted(BaseException):
    """Stands for Ctrl-C (KeyboardInterrupt) without pytest taking it for one."""


@pytest.mark.parametrize("at", ["after the projection", "before the projection"])
def test_a_unit_interrupted_while_its_pipeline_is_queued_writes_nothing(
    service: SecretService, schema: str, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    """The pipeline is its own implicit transaction, and psycopg sends the Sync that would
    commit it even when the block that queues it raises: the connection must be closed
    first, so the server rolls the half-queued unit back."""
    from keyledger.infrastructure import postgres_store

    original = postgres_store.write_unit_rest

    def interrupted(cur: Any, unit: WriteUnit, positions: Any) -> None:
        if at == "after the projection":
            original(cur, unit, positions)  # everything but the sync is queued
        raise _Interrupted

    before, catalog = _events(schema), _catalog(schema)
    monkeypatch.setattr(postgres_store, "write_unit_rest", interrupted)
    with pytest.raises(_Interrupted):  # a disable goes the pipeline way
        service.change_for_tenant(TENANT, "api-key", "disable", make_actor("x"))
    monkeypatch.undo()

    assert _events(schema) == before
    assert _catalog(schema) == catalog
    # The service goes on (its cache was never ahead of the store).
    assert service.change_for_tenant(TENANT, "api-key", "disable", make_actor("x"))
    assert [info.name for info in service.list_for_tenant(TENANT, status="disabled")] == ["api-key"]


def test_a_stale_unit_the_server_refuses_while_the_pipeline_is_queued_is_a_conflict(
    service: SecretService, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the server's refusal (KL409) arrives while the rest of the unit is still being
    queued, psycopg raises it from a later statement: it is still a stale decision, not a
    storage failure, and nothing is written."""
    from keyledger.infrastructure import postgres_store

    recorder = _recorder(service)
    secret, events, stored = _disabling(service)
    original = postgres_store.write_unit_rest

    def slow(cur: Any, unit: WriteUnit, positions: Any) -> None:
        time.sleep(0.2)  # the server's answer to the head statement arrives meanwhile
        original(cur, unit, positions)

    monkeypatch.setattr(postgres_store, "write_unit_rest", slow)
    before = _events(schema)
    stale = WriteUnit(expected={secret.id: secret.version + 5}, domain_events=events)
    with pytest.raises(StaleStateError):
        recorder.insert_events(stored, unit=stale)
    monkeypatch.undo()

    assert _events(schema) == before
    assert service.store_for_tenant(TENANT, "api-key", "value-c").version == 2
