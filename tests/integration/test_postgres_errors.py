"""Operational errors on PostgreSQL: a server that does not answer, a table lock held too long,
connections killed by the server. Users get ``StorageError`` (never a raw driver error), no
password in any message, nothing half written, and the service recovers by itself.

Each test has its own schema (kl_<run>_xe<n>). The service's connections are told apart
from every other client of the server by a unique application_name (libpq's PGAPPNAME), so
pg_terminate_backend only ever hits the service under test.
"""

from __future__ import annotations

import gc
import itertools
import logging
import random
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql
from pydantic import SecretStr

from conftest import POSTGRES_URL, RUN_ID
from keyledger import KeyledgerError, SecretService, StorageError, super_admin
from keyledger.infrastructure.settings import KeyledgerSettings
from threaded import Outcome, start

pytestmark = pytest.mark.postgres

TENANT = "tenant-ops"
PASSWORD = "hunter2"
EVERYTHING = 1_000_000
_numbers = itertools.count(1)


@pytest.fixture(autouse=True)
def _collect_half_built_services() -> Iterator[None]:
    """Collect garbage after each test, so that whatever a failed create left unreferenced is
    finalised here, not during a later test. (A failed create must close its own pool: see
    test_a_store_that_cannot_be_opened_leaves_no_connection_pool_running, which checks
    that before this runs.)"""
    yield
    gc.collect()


@pytest.fixture
def amk() -> str:
    return secrets.token_hex(32)


@pytest.fixture
def app_name(monkeypatch: pytest.MonkeyPatch) -> str:
    """A unique application_name for every connection this test's services open."""
    name = f"kl-test-{RUN_ID}-{next(_numbers)}"
    monkeypatch.setenv("PGAPPNAME", name)
    return name


@pytest.fixture
def admin(_postgres_server: None) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection outside keyledger (not carrying the test's app name)."""
    with psycopg.connect(
        POSTGRES_URL, autocommit=True, connect_timeout=5, application_name="kl-test-admin"
    ) as conn:
        yield conn


@contextmanager
def _table_locked(schema: str) -> Iterator[None]:
    """Another client holds ACCESS EXCLUSIVE on the event table until the block ends."""
    with psycopg.connect(POSTGRES_URL, connect_timeout=5, application_name="kl-test-lock") as c:
        c.execute("SET lock_timeout = '5s'")
        c.execute(
            sql.SQL("LOCK TABLE {}.keyledger_events IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(schema)
            )
        )
        try:
            yield
        finally:
            c.rollback()


def _under_lock(
    schema: str, calls: dict[str, Callable[[], Any]], limit: float
) -> dict[str, Outcome]:
    """Run each call while the table is locked; give each ``limit`` seconds; then release."""
    outcomes: dict[str, Outcome] = {}
    threads: list[threading.Thread] = []
    with _table_locked(schema):
        for label, call in calls.items():
            outcome, thread = start(call, label)
            thread.join(limit)
            outcome.hung = thread.is_alive()
            outcomes[label] = outcome
            threads.append(thread)
            if outcome.hung:
                break  # it hangs; release the lock (below) so that it can end
    for thread in threads:
        thread.join(15)
    return outcomes


def _audit(service: SecretService) -> list[Any]:
    with super_admin():
        return service.get_audit_logs(limit=EVERYTHING)


def _terminate(admin: psycopg.Connection[Any], app_name: str) -> int:
    """pg_terminate_backend on every connection of the services under test."""
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()",
        (app_name,),
    ).fetchall()
    return sum(1 for (done,) in rows if done)


def _assert_consistent(service: SecretService) -> None:
    """Read models equal a rebuild; the audit log and the catalog agree on what exists."""
    listed = service.list_for_tenant(TENANT, status=None, include_expired=True)
    audit = _audit(service)
    keys = service.list_keys(TENANT)
    service.rebuild_read_models()
    assert service.list_for_tenant(TENANT, status=None, include_expired=True) == listed
    assert _audit(service) == audit
    assert service.list_keys(TENANT) == keys
    created = {e.secret_name for e in audit if e.action == "create" and e.result == "success"}
    assert created == {info.name for info in listed}
    for info in listed:
        writes = [
            e
            for e in audit
            if e.secret_name == info.name
            and e.action in ("create", "update")
            and e.result == "success"
            and not e.details.get("reencrypted")
        ]
        assert len(writes) == info.version, info.name
    newest = max(key.version for key in keys)
    assert [key.version for key in keys if key.status == "active"] == [newest]
    assert sorted(key.version for key in keys) == list(range(1, newest + 1))


# -- server down ------------------------------------------------------------------------


def test_opening_a_store_on_a_server_that_does_not_answer_raises_storage_error_quickly(
    amk: str,
) -> None:
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        SecretService.create(
            "postgresql://postgres@127.0.0.1:1/test?connect_timeout=1", master_key=amk
        )

    assert time.monotonic() - started < 10
    assert not isinstance(raised.value, psycopg.Error)
    assert raised.value.__cause__ is None  # no raw driver traceback chained for users
    assert str(raised.value)


def _pool_threads() -> set[threading.Thread]:
    """The connection pools' threads (psycopg_pool: pool-<n>-scheduler, pool-<n>-worker-<m>)."""
    return {thread for thread in threading.enumerate() if thread.name.startswith("pool-")}


def test_a_store_that_cannot_be_opened_leaves_no_connection_pool_running(amk: str) -> None:
    # Threads, not a count: a pool thread of an earlier test may end meanwhile, and the
    # count would then hide a new one.
    before = _pool_threads()

    with pytest.raises(StorageError) as raised:  # the caller keeps the error, as loggers do
        SecretService.create(
            "postgresql://postgres@127.0.0.1:1/test?connect_timeout=1", master_key=amk
        )

    deadline = time.monotonic() + 3
    while _pool_threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(thread.name for thread in _pool_threads() - before) == []
    # ...while the error, its traceback and the frames of the failed create are still held.
    error = raised.value
    assert type(error) is StorageError
    assert str(error).startswith("cannot open the store: ")
    assert error.__traceback__ is not None


@pytest.mark.parametrize(
    ("url", "error"),
    [
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test?connect_timeout=1", StorageError),
        (f"postgresql://admin:{PASSWORD}@127.0.0.1:1/test?connect_timeout=1", StorageError),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/?connect_timeout=1", KeyledgerError),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test?bogus=1", KeyledgerError),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test?lock_timeout=0", KeyledgerError),
    ],
    ids=["unreachable", "unreachable-other-user", "no-database", "unknown-option", "bad-option"],
)
def test_a_password_in_the_database_url_never_appears_in_errors_or_logs(
    amk: str, url: str, error: type[Exception], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    with pytest.raises(error) as raised:
        SecretService.create(url, master_key=amk)

    shown = [
        str(raised.value),
        repr(raised.value),
        "".join(traceback.format_exception(raised.value)),
        caplog.text,
    ]
    assert all(PASSWORD not in text for text in shown)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/kl_no_such_db?connect_timeout=1",
            'database "kl_no_such_db" does not exist',
        ),
        (
            f"postgresql://kl_no_such_role:{PASSWORD}@127.0.0.1:5432/test?connect_timeout=1",
            'role "kl_no_such_role" does not exist',
        ),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test?connect_timeout=1", "refused"),
    ],
    ids=["no-such-database", "no-such-role", "nothing-listening"],
)
def test_a_store_that_cannot_be_reached_says_why(amk: str, url: str, reason: str) -> None:
    """Found by review: only the pool's "couldn't get a connection after 5.00 sec" was
    shown, the server's reason dropped. The reason, never the password."""
    with pytest.raises(StorageError) as raised:
        SecretService.create(url, master_key=amk)
    assert str(raised.value).startswith("cannot open the store: ")
    assert reason in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_a_password_given_through_the_environment_never_appears_in_errors_or_reprs(
    amk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test?connect_timeout=1"
    monkeypatch.setenv("KEYLEDGER_DATABASE_URL", url)

    settings = KeyledgerSettings()
    with pytest.raises(StorageError) as raised:
        SecretService.create(master_key=amk)

    configured = settings.database_url  # a SecretStr since the URL may hold a password
    assert (
        configured.get_secret_value() if isinstance(configured, SecretStr) else configured
    ) == url
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert PASSWORD not in "".join(traceback.format_exception(raised.value))


def test_a_service_opened_with_a_password_does_not_show_it_in_its_repr(
    schema: str, amk: str
) -> None:
    # The test server trusts every local connection, so any password is accepted.
    host = POSTGRES_URL.split("@", 1)[1]
    url = f"postgresql://postgres:{PASSWORD}@{host}?schema={schema}"
    with SecretService.create(url, master_key=amk) as service:
        service.store_for_tenant(TENANT, "a", "value")
        assert PASSWORD not in repr(service)
        assert PASSWORD not in str(service)


# -- lock timeout -----------------------------------------------------------------------


def test_calls_blocked_by_a_table_lock_fail_with_storage_error_within_seconds_and_write_nothing(
    schema: str, amk: str
) -> None:
    url = f"{POSTGRES_URL}?schema={schema}&lock_timeout=1"
    with SecretService.create(url, master_key=amk) as service:
        service.store_for_tenant(TENANT, "existing", "first", user_id="alice")
        assert service.retrieve_for_tenant(TENANT, "existing").access_count == 1
        audit = _audit(service)
        listed = service.list_for_tenant(TENANT, status=None)

        outcomes = _under_lock(
            schema,
            {
                "store a new name": lambda: service.store_for_tenant(TENANT, "new", "v"),
                "update a name": lambda: service.store_for_tenant(TENANT, "existing", "second"),
                "retrieve": lambda: service.retrieve_for_tenant(TENANT, "existing"),
                "rotate": lambda: service.rotate_key_for_tenant(TENANT),
            },
            limit=8,
        )

        for label, outcome in outcomes.items():
            assert not outcome.hung, f"{label}: still blocked after 8 s"
            assert isinstance(outcome.error, StorageError), f"{label}: {outcome.error!r}"
            assert outcome.seconds is not None
            assert outcome.seconds < 5, f"{label} took {outcome.seconds:.1f} s"
            assert outcome.value is None  # a blocked retrieve returns no value (fail closed)
        assert len(outcomes) == 4

        # Nothing was written: the same audit log, the same secrets, the same key.
        assert _audit(service) == audit
        assert service.list_for_tenant(TENANT, status=None) == listed
        assert [key.version for key in service.list_keys(TENANT)] == [1]
        secret = service.retrieve_for_tenant(TENANT, "existing")
        assert (secret.value, secret.version, secret.access_count) == ("first", 1, 2)
        with super_admin():
            assert not service.get_audit_logs(tenant_id=TENANT, secret_name="new")


def test_a_blocked_call_gives_up_after_the_configured_lock_timeout_not_a_multiple_of_it(
    schema: str, amk: str
) -> None:
    """Every kind of write: those the server writes in one call of a function (a store)
    and those sent as a pipeline (a rotation, a status change: found by review, they
    gave up after twice the timeout, the lock timeout taken for a lost connection)."""
    url = f"{POSTGRES_URL}?schema={schema}&lock_timeout=2"
    with SecretService.create(url, master_key=amk) as service:
        service.store_for_tenant(TENANT, "existing", "first")
        outcomes = _under_lock(
            schema,
            {
                "store": lambda: service.store_for_tenant(TENANT, "existing", "second"),
                "rotate": lambda: service.rotate_key_for_tenant(TENANT),
                "disable": lambda: service.disable_for_tenant(TENANT, "existing"),
            },
            limit=10,
        )

    for label, outcome in outcomes.items():
        assert not outcome.hung, label
        assert isinstance(outcome.error, StorageError), label
        assert outcome.seconds is not None
        assert outcome.seconds < 3.5, f"{label} gave up after {outcome.seconds:.1f} s, not ~2 s"


def test_a_service_that_must_load_from_the_stream_also_gives_up_on_a_table_lock_in_seconds(
    schema: str, amk: str
) -> None:
    url = f"{POSTGRES_URL}?schema={schema}&lock_timeout=1"
    with SecretService.create(url, master_key=amk) as writer:
        writer.store_for_tenant(TENANT, "existing", "first")
    with SecretService.create(url, master_key=amk) as service:  # nothing cached yet
        outcomes = _under_lock(
            schema, {"retrieve": lambda: service.retrieve_for_tenant(TENANT, "existing")}, 6
        )

        outcome = outcomes["retrieve"]
        assert not outcome.hung, "retrieve still blocked after 6 s"
        assert isinstance(outcome.error, StorageError)
        assert outcome.seconds is not None
        assert outcome.seconds < 5


# -- connections killed -----------------------------------------------------------------


def _until_it_works(call: Callable[[], Any], errors: list[StorageError], attempts: int) -> Any:
    """Call until it succeeds; StorageError is expected on the way, nothing else is."""
    for _ in range(attempts):
        try:
            return call()
        except StorageError as error:
            errors.append(error)
    pytest.fail(f"still failing after {attempts} attempts: {errors[-1]!r}")


def test_after_the_server_drops_every_connection_calls_raise_storage_error_then_recover(
    schema: str, amk: str, app_name: str, admin: psycopg.Connection[Any]
) -> None:
    url = f"{POSTGRES_URL}?schema={schema}&pool_size=2&max_overflow=2"
    with SecretService.create(url, master_key=amk) as service:
        service.store_for_tenant(TENANT, "before", "value-before")
        assert service.retrieve_for_tenant(TENANT, "before").value == "value-before"

        calls: dict[str, Callable[[], Any]] = {
            "store": lambda: service.store_for_tenant(TENANT, "after", "value-after"),
            "retrieve": lambda: service.retrieve_for_tenant(TENANT, "before").value,
            "list": lambda: [i.name for i in service.list_for_tenant(TENANT)],
            "audit": lambda: len(_audit(service)),
            "rotate": lambda: service.rotate_key_for_tenant(TENANT).version,
            "reencrypt": lambda: service.reencrypt_all_for_tenant(TENANT).failed,
        }
        errors: list[StorageError] = []
        results = {}
        for label, call in calls.items():
            killed = _terminate(admin, app_name)
            assert killed >= 1, "the service's connections were not found"
            results[label] = _until_it_works(call, errors, attempts=killed + 2)

        assert results["retrieve"] == "value-before"
        assert results["list"] == ["after", "before"]
        assert results["rotate"] == 2
        assert results["reencrypt"] == 0
        assert all(PASSWORD not in str(error) for error in errors)

        _assert_consistent(service)
        assert service.retrieve_for_tenant(TENANT, "after").value == "value-after"
        assert service.retrieve_for_tenant(TENANT, "before").key_version == 2


def test_calls_after_the_server_dropped_every_idle_connection_succeed_at_the_first_attempt(
    schema: str, amk: str, app_name: str, admin: psycopg.Connection[Any]
) -> None:
    # A connection found dead before any work was sent on it is safe to replace: callers
    # should not see the drop at all.
    with SecretService.create(f"{POSTGRES_URL}?schema={schema}", master_key=amk) as service:
        service.store_for_tenant(TENANT, "a", "value")
        calls: dict[str, Callable[[], Any]] = {
            "list": lambda: [info.name for info in service.list_for_tenant(TENANT)],
            "retrieve": lambda: service.retrieve_for_tenant(TENANT, "a").value,
            "store": lambda: service.store_for_tenant(TENANT, "a", "value-2").version,
            "audit": lambda: len(_audit(service)),
        }
        results = {}
        for label, call in calls.items():
            assert _terminate(admin, app_name) >= 1
            results[label] = call()

        assert results == {"list": ["a"], "retrieve": "value", "store": 2, "audit": 4}


def test_connections_killed_in_the_middle_of_stores_and_reads_leave_nothing_half_written(
    schema: str, amk: str, app_name: str, admin: psycopg.Connection[Any]
) -> None:
    url = f"{POSTGRES_URL}?schema={schema}&pool_size=2&max_overflow=2"
    with SecretService.create(url, master_key=amk) as service:
        service.store_for_tenant(TENANT, "hot", "hot-value")
        stop = threading.Event()
        report: dict[str, Any] = {
            "stored": [],
            "store_failed": [],
            "reads": 0,
            "read_failed": 0,
            "unexpected": [],
        }

        def work() -> None:
            for i in itertools.count():
                if stop.is_set():
                    return
                name = f"s-{i}"
                try:
                    service.store_for_tenant(TENANT, name, f"value-{name}")
                    report["stored"].append(name)
                except StorageError:
                    report["store_failed"].append(name)
                except Exception as error:
                    report["unexpected"].append(repr(error))
                try:
                    if service.retrieve_for_tenant(TENANT, "hot").value != "hot-value":
                        report["unexpected"].append("wrong value")
                    report["reads"] += 1
                except StorageError:
                    report["read_failed"] += 1
                except Exception as error:
                    report["unexpected"].append(repr(error))

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            for _ in range(12):
                time.sleep(random.uniform(0.02, 0.08))
                _terminate(admin, app_name)
            time.sleep(0.1)
        finally:
            stop.set()
            worker.join(30)
        assert not worker.is_alive(), "the worker hung after its connections were killed"

        assert report["unexpected"] == []
        # Some call was interrupted: it failed, or its connection came back to the pool
        # broken and the write was settled and sent again (most are, since 0.5.0).
        broken = service._ledger.store.datastore.pool.get_stats().get("returns_bad", 0)
        assert report["store_failed"] or report["read_failed"] or broken, "nothing was hit"
        assert report["stored"], "no store ever succeeded between the kills"

        errors: list[StorageError] = []
        _until_it_works(lambda: service.store_for_tenant(TENANT, "last", "value-last"), errors, 6)
        _assert_consistent(service)

        listed = {info.name: info for info in service.list_for_tenant(TENANT, status=None)}
        # Every store that returned is there; a store that failed is there entirely or not
        # at all; every value reads back.
        assert set(report["stored"]) <= set(listed)
        assert set(listed) <= {"hot", "last", *report["stored"], *report["store_failed"]}
        for name in listed:
            expected = "hot-value" if name == "hot" else f"value-{name}"
            assert service.retrieve_for_tenant(TENANT, name).value == expected
        # Every read that returned a value is in the audit log (a failed one may be too:
        # the server may have committed it just before the connection died).
        with super_admin():
            reads = service.get_audit_logs(
                tenant_id=TENANT,
                secret_name="hot",
                action="read",
                result="success",
                limit=EVERYTHING,
            )
        successful_reads = report["reads"] + 1  # and the one just above
        assert successful_reads <= len(reads) <= successful_reads + report["read_failed"]
        assert listed["hot"].access_count == len(reads) - 1
