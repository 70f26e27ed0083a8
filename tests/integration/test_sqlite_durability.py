"""SQLite durability and fail-closed behaviour, on a file opened the normal way.

The README promises that a store or read that returned survives a power cut (WAL journal,
``synchronous=FULL``: the WAL is fsynced at every commit), and that a store that cannot
take the write lock fails with ``StorageError`` instead of returning a value it did not
record. A power cut cannot be simulated here; what is checked is the configuration that
provides it (on the connection every thread writes with) and that a commit is done before
a call returns (a process killed right after its call lost nothing).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyledger import SecretService, StorageError, super_admin, tenant
from keyledger.application import ledger as ledger_module
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.infrastructure.sqlite_store import KeyledgerSQLiteDatastore

TENANT = "tenant-durable"
FULL = 2  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA
LOCK_TIMEOUT = 1  # seconds (KEYLEDGER_LOCK_TIMEOUT_SECONDS takes whole seconds, at least 1)
BLOCKED_LIMIT = 10.0  # a generous bound on how long a call blocked by the lock may take


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "k.db"


@pytest.fixture
def sqlite_service(db_file: Path, master_key: str) -> Iterator[SecretService]:
    """A service on a SQLite file, created the way users create one."""
    with SecretService.create(f"sqlite:///{db_file}", master_key=master_key) as opened:
        yield opened


def _datastore(service: SecretService) -> KeyledgerSQLiteDatastore:
    datastore = service._ledger.store._datastore  # type: ignore[attr-defined]
    assert isinstance(datastore, KeyledgerSQLiteDatastore)
    return datastore


def _used_writer_settings(service: SecretService) -> tuple[int, str]:
    """(synchronous, journal_mode) of the writer connection this thread's last write used.

    The writer must already exist (``thread_writer()`` would otherwise create one here, and
    the test would check a connection no write went through)."""
    holder = getattr(_datastore(service)._writers, "holder", None)
    assert holder is not None, "this thread's write did not go through its thread writer"
    writer = holder.conn
    assert writer is _datastore(service).thread_writer()
    [synchronous] = writer.raw.execute("PRAGMA synchronous").fetchone()
    [journal_mode] = writer.raw.execute("PRAGMA journal_mode").fetchone()
    return synchronous, str(journal_mode).lower()


def test_the_connection_every_thread_writes_with_is_in_wal_mode_and_fsyncs_every_commit(
    sqlite_service: SecretService,
) -> None:
    service = sqlite_service
    with tenant(TENANT):
        service.store("main-thread", "v")
        assert service.retrieve("main-thread").value == "v"
    assert _used_writer_settings(service) == (FULL, "wal")

    seen: dict[str, Any] = {}

    def other_thread() -> None:
        try:
            with tenant(TENANT):
                service.store("other-thread", "w")
                assert service.retrieve("other-thread").value == "w"
            seen["writer"] = _datastore(service)._writers.holder.conn
            seen["settings"] = _used_writer_settings(service)
        except BaseException as error:  # reported by the test's thread below
            seen["error"] = error

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert "error" not in seen, repr(seen.get("error"))
    assert seen["writer"] is not _datastore(service).thread_writer()  # its own connection
    assert seen["settings"] == (FULL, "wal")


# A child that stores values and SIGKILLs itself the moment its last store returns.
KILLED_AFTER_STORE = r"""
import json, os, signal, sys

from keyledger import SecretService, tenant

args = json.loads(sys.argv[1])
service = SecretService.create(args["url"], master_key=args["amk"])
with tenant(args["tenant"]):
    for name, value in args["values"].items():
        service.store(name, value)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_store_has_committed_when_it_returns_even_if_the_process_is_killed_at_once(
    db_file: Path, master_key: str
) -> None:
    """A process SIGKILLed right after ``store()`` returned (no close, no checkpoint, no
    exit handlers) lost nothing: the store was committed before it returned. This tests
    commit-before-return only; surviving a power cut (fsync) is the PRAGMA test's part."""
    url = f"sqlite:///{db_file}"
    with SecretService.create(url, master_key=master_key), tenant(TENANT):
        pass  # the file and its tables exist before the child starts
    values = {f"name-{i}": f"value-{i}" for i in range(3)}
    payload = {"url": url, "amk": master_key, "tenant": TENANT, "values": values}
    child = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_STORE, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]

    with SecretService.create(url, master_key=master_key) as service, tenant(TENANT):
        for name, value in values.items():
            secret = service.retrieve(name)
            assert (secret.value, secret.version) == (value, 1), name
        writes = service.get_audit_logs(action="create", result="success")
        assert sorted(str(entry.secret_name) for entry in writes) == sorted(values)


# -- fail closed: the write lock held by another connection -----------------------------------


def _raw_counts(db_file: Path) -> tuple[int, int, int]:
    """(newest event position, event count, key material rows), read around keyledger."""
    conn = sqlite3.connect(db_file, timeout=30)
    try:
        row = conn.execute(
            "SELECT (SELECT coalesce(max(rowid), 0) FROM stored_events), "
            "(SELECT count(*) FROM stored_events), (SELECT count(*) FROM kl_key_material)"
        ).fetchone()
    finally:
        conn.close()
    return int(row[0]), int(row[1]), int(row[2])


def _run_with_limit(call: Callable[[], Any], limit: float) -> tuple[Any, BaseException | None]:
    """(what ``call`` returned, what it raised), failing the test if it takes ``limit`` s."""
    outcome: dict[str, Any] = {"value": None, "error": None}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still blocked after {limit} s"
    return outcome["value"], outcome["error"]


@pytest.mark.parametrize("fresh_service", [False, True], ids=["cached", "new-service"])
def test_a_retrieve_that_cannot_record_its_read_fails_closed_and_writes_nothing(
    db_file: Path, master_key: str, fresh_service: bool
) -> None:
    url = f"sqlite:///{db_file}"
    settings = KeyledgerSettings(lock_timeout_seconds=LOCK_TIMEOUT)
    with SecretService.create(url, master_key=master_key, settings=settings) as writer:
        writer.store_for_tenant(TENANT, "token", "the-value", user_id="alice")
        assert writer.retrieve_for_tenant(TENANT, "token").access_count == 1
    service = SecretService.create(url, master_key=master_key, settings=settings)
    try:
        if not fresh_service:  # the secret and its keyring are cached: no read before the write
            assert service.retrieve_for_tenant(TENANT, "token").access_count == 2
        with super_admin():
            audit = service.get_audit_logs(limit=1_000_000)
        [info] = service.list_for_tenant(TENANT)
        raw = _raw_counts(db_file)

        holder = sqlite3.connect(db_file, isolation_level=None, timeout=30)
        try:
            holder.execute("BEGIN IMMEDIATE")  # the write lock, until the rollback below
            started = time.monotonic()
            value, error = _run_with_limit(
                lambda: service.retrieve_for_tenant(TENANT, "token", user_id="bob"),
                BLOCKED_LIMIT,
            )
            seconds = time.monotonic() - started
        finally:
            holder.rollback()
            holder.close()

        assert value is None, "a retrieve whose read was not recorded returned the secret"
        assert isinstance(error, StorageError), repr(error)
        assert seconds < BLOCKED_LIMIT
        assert "the-value" not in str(error)
        # Lock released: nothing of the failed retrieve was written, not even a failure entry.
        assert _raw_counts(db_file) == raw
        assert service.list_for_tenant(TENANT) == [info]
        with super_admin():
            assert service.get_audit_logs(limit=1_000_000) == audit
            assert service.get_audit_logs(user_id="bob") == []
        # And the service works again at once.
        secret = service.retrieve_for_tenant(TENANT, "token", user_id="bob")
        assert (secret.value, secret.access_count) == ("the-value", info.access_count + 1)
    finally:
        service.close()


def test_a_store_blocked_by_the_write_lock_fails_with_storage_error_and_writes_nothing(
    db_file: Path, master_key: str
) -> None:
    url = f"sqlite:///{db_file}"
    settings = KeyledgerSettings(lock_timeout_seconds=LOCK_TIMEOUT)
    with SecretService.create(url, master_key=master_key, settings=settings) as service:
        service.store_for_tenant(TENANT, "token", "first")
        with super_admin():
            audit = service.get_audit_logs(limit=1_000_000)
        raw = _raw_counts(db_file)

        holder = sqlite3.connect(db_file, isolation_level=None, timeout=30)
        try:
            holder.execute("BEGIN IMMEDIATE")
            outcomes = [
                _run_with_limit(lambda: service.store_for_tenant(TENANT, "token", "2"), 10),
                _run_with_limit(lambda: service.store_for_tenant(TENANT, "new", "v"), 10),
                _run_with_limit(lambda: service.rotate_key_for_tenant(TENANT), 10),
            ]
        finally:
            holder.rollback()
            holder.close()

        for value, error in outcomes:
            assert value is None
            assert isinstance(error, StorageError), repr(error)
        assert _raw_counts(db_file) == raw
        with super_admin():
            assert service.get_audit_logs(limit=1_000_000) == audit
        assert [key.version for key in service.list_keys(TENANT)] == [1]
        secret = service.retrieve_for_tenant(TENANT, "token")
        assert (secret.value, secret.version) == ("first", 1)
        assert [info.name for info in service.list_for_tenant(TENANT)] == ["token"]


def test_opening_a_complete_store_for_reading_does_not_wait_for_the_write_lock(
    db_file: Path, master_key: str
) -> None:
    """A read-only command (listing, an audit query) opened while a long write runs
    answers at once: the schema is looked at before the write lock is asked for."""
    url = f"sqlite:///{db_file}"
    settings = KeyledgerSettings(lock_timeout_seconds=LOCK_TIMEOUT)
    with SecretService.create(url, master_key=master_key, settings=settings) as service:
        service.store_for_tenant(TENANT, "token", "first")

    holder = sqlite3.connect(db_file, isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")
        opened, error = _run_with_limit(
            lambda: SecretService.create(url, master_key=master_key, settings=settings), 10
        )
        assert error is None, repr(error)
        assert opened is not None
        try:
            assert [info.name for info in opened.list_for_tenant(TENANT)] == ["token"]
            assert [key.version for key in opened.list_keys(TENANT)] == [1]
        finally:
            opened.close()
    finally:
        holder.rollback()
        holder.close()


def test_a_snapshot_that_cannot_be_written_does_not_fail_the_committed_store(
    db_file: Path,
    master_key: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every SNAPSHOT_INTERVAL-th version of a secret is snapshotted after its write has
    committed. When another connection holds the write lock at that moment, the snapshot
    waits out the lock timeout and fails; the store that returned must not look failed
    (a caller retrying it would write the value again)."""
    settings = KeyledgerSettings(lock_timeout_seconds=LOCK_TIMEOUT)
    service = SecretService.create(f"sqlite:///{db_file}", master_key=master_key, settings=settings)
    monkeypatch.setattr(ledger_module, "SNAPSHOT_INTERVAL", 3)
    ledger = service._ledger
    take_snapshot = ledger.take_snapshot
    blocker = sqlite3.connect(db_file, isolation_level=None)

    def locked_out(*args: Any, **kwargs: Any) -> Any:
        blocker.execute("BEGIN IMMEDIATE")  # someone else writes right after our commit
        try:
            return take_snapshot(*args, **kwargs)
        finally:
            blocker.execute("ROLLBACK")

    monkeypatch.setattr(ledger, "take_snapshot", locked_out)
    try:
        for n in range(1, 4):
            info = service.store_for_tenant(TENANT, "api-key", f"value-{n}")  # version 3 last
        assert info.version == 3
        assert any("snapshot" in r.getMessage() for r in caplog.records)
        assert not any("value-" in r.getMessage() for r in caplog.records)
        reopened = SecretService.create(f"sqlite:///{db_file}", master_key=master_key)
        assert reopened.retrieve_for_tenant(TENANT, "api-key").value == "value-3"
        assert reopened.retrieve_for_tenant(TENANT, "api-key").version == 3
        reopened.close()
    finally:
        blocker.close()
        service.close()


def _open_files(path: Path) -> int:
    """File descriptors of this process open on ``path`` or its -wal/-shm files."""
    names = {str(path), f"{path}-wal", f"{path}-shm"}
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(fd) in names
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_thread_s_writer_connection_is_closed_when_the_thread_ends(
    sqlite_service: SecretService, db_file: Path
) -> None:
    """A server that runs each request on a new thread must not keep a connection (two
    file descriptors) open for every thread it ever ran: 200 such threads used to hold
    400 descriptors, and a process ran out of them within a few thousand requests."""
    service = sqlite_service
    service.store_for_tenant(TENANT, "api-key", "v")  # the main thread's writer
    before = _open_files(db_file)
    errors: list[BaseException] = []

    def request(n: int) -> None:
        try:
            service.store_for_tenant(TENANT, f"name-{n}", "v")
            assert service.retrieve_for_tenant(TENANT, "api-key").value == "v"
        except BaseException as error:
            errors.append(error)

    for n in range(200):
        thread = threading.Thread(target=request, args=(n,))
        thread.start()
        thread.join(30)

    assert errors == []
    assert _open_files(db_file) <= before + 2  # (a pooled reader may have been added)
    assert _datastore(service).open_writers() == 1  # the main thread's, still in use
    assert len(service.list_for_tenant(TENANT, limit=1000)) == 201


def test_a_datastore_nobody_closed_can_be_collected_while_its_writers_thread_lives(
    tmp_path: Path,
) -> None:
    """The finalizer that closes a thread's writer must not keep the datastore alive (the
    main thread, which wrote, lives as long as the process)."""
    refs = []
    for n in range(5):
        datastore = KeyledgerSQLiteDatastore(str(tmp_path / f"db{n}.sqlite"))
        datastore.thread_writer().raw.execute("SELECT 1")
        refs.append(weakref.ref(datastore))
        del datastore
    gc.collect()

    assert [ref() for ref in refs] == [None] * 5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_closes_every_idle_connection_first_and_each_side_opens_its_own(
    tmp_path: Path,
) -> None:
    """SQLite forbids a child to use connections, or SQLite's record of their locks,
    inherited from its parent: a fork closes every connection of the file first (here
    another thread's idle writer), so the child inherits none open; both sides then
    write on connections of their own, the parent's other thread included."""
    datastore = KeyledgerSQLiteDatastore(str(tmp_path / "k.sqlite"))
    ready, forked = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def other_thread() -> None:
        seen["writer"] = datastore.thread_writer()
        ready.set()
        forked.wait(timeout=30)
        seen["after"] = datastore.thread_writer()
        seen["after"].raw.execute("CREATE TABLE parent_side (x)")

    thread = threading.Thread(target=other_thread)
    thread.start()
    ready.wait(timeout=30)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the other thread does not exist here
        try:
            try:
                seen["writer"].raw.total_changes  # noqa: B018 (raises once closed)
                verdict = b"inherited an open writer"
            except sqlite3.ProgrammingError:
                datastore.thread_writer().raw.execute("CREATE TABLE child_side (x)")
                verdict = b"own writer"
        except Exception as error:  # reported to the parent
            verdict = repr(error).encode()
        os.write(write, verdict)
        os._exit(0)
    forked.set()
    os.close(write)
    os.waitpid(pid, 0)
    verdict = os.read(read, 100)
    os.close(read)
    thread.join(timeout=30)

    assert verdict == b"own writer"
    assert seen["after"] is not seen["writer"]
    tables = {
        row[0] for row in datastore.thread_writer().raw.execute("SELECT name FROM sqlite_master")
    }
    assert {"parent_side", "child_side"} <= tables
    assert datastore.open_writers() == 1  # the other thread's ended with it: this one's
    datastore.close()


def test_opening_a_new_file_another_connection_holds_waits_for_it_not_fails_at_once(
    tmp_path: Path,
) -> None:
    """Switching a new file to WAL needs it to itself, and SQLite answers "database is
    locked" at once instead of waiting: processes opening a new file together failed
    within milliseconds (found by review). Now the switch waits, up to the lock timeout,
    as every other lock does."""
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other_program (x)")  # a file still in rollback mode
    holder.execute("BEGIN IMMEDIATE")  # its write lock, held (as a process creating the
    holder.execute("INSERT INTO other_program VALUES (1)")  # file's tables holds it)
    release = threading.Timer(0.5, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        started = time.monotonic()
        with SecretService.create(
            f"sqlite:///{path}",
            master_key=os.urandom(32).hex(),
            settings=KeyledgerSettings(lock_timeout_seconds=10),
        ) as service:
            service.store_for_tenant("acme", "db", "v")
            waited = time.monotonic() - started
    finally:
        release.join()
        holder.close()
    assert waited >= 0.4  # (it waited for the lock rather than failing)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
