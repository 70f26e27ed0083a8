"""Decisions that keep losing the race to other writers are made under the write lock.

Every write and recorded read is decided on state read without a lock and commits only
if that state has not moved on. Before 0.15.0 a secret stored back to back by other
writers could starve its readers: each retry was decided afresh and lost again, and
after 50 attempts the retrieve failed with ``StorageError``. From the fifth attempt on,
the decision is now made with the store's write lock taken first, where nobody can move
the state on before it commits.

Here the race is lost on purpose: another service (another process, as far as the store
can tell) stores the secret between each decision and its commit, whenever it can.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import BACKENDS, POSTGRES_URL, MakeService, shared_store_url
from keyledger import SecretDisabled, SecretService, StorageError, tenant
from keyledger.application import ledger as ledger_module
from keyledger.application.ledger import Ledger
from keyledger.domain.ids import secret_id
from keyledger.infrastructure.settings import KeyledgerSettings

ACME = "acme"
HOT = "hot"
POSTGRES = [param for param in BACKENDS if param.id == "postgres"]
LANDING = 30.0  # seconds a decision made without the lock waits for the other's store
HELD_BACK = 0.2  # seconds a decision made under the lock gives it (it cannot land)


class OtherWriter:
    """Stores ``HOT`` from another service, in a thread of its own, after each load of
    it by the service under test: a store that can commit does so before the decision
    goes on; one that cannot (the write lock is held) commits after it."""

    def __init__(self, other: SecretService, holding: Callable[[], bool]) -> None:
        self.other = other
        self.holding = holding  # whether the decision under test holds the write lock
        self.threads: list[threading.Thread] = []
        self.failures: list[BaseException] = []
        self.disable_at: int | None = None  # the turn at which it disables instead
        # The turn at which it compromises key version 1 and disables and enables the
        # secret (which moves the secret on, still under version 1) instead.
        self.compromise_at: int | None = None

    def store_meanwhile(self) -> None:
        turn = len(self.threads) + 1
        thread = threading.Thread(target=self._write, args=(turn,))
        self.threads.append(thread)
        thread.start()
        thread.join(HELD_BACK if self.holding() else LANDING)

    def _write(self, turn: int) -> None:
        try:
            if turn == self.disable_at:
                self.other.disable_for_tenant(ACME, HOT)
            elif turn == self.compromise_at:
                self.other.compromise_key_for_tenant(ACME, 1, "leaked")
                self.other.disable_for_tenant(ACME, HOT)
                self.other.enable_for_tenant(ACME, HOT)
            else:
                self.other.store_for_tenant(ACME, HOT, f"v{turn}")
        except BaseException as error:  # reported by the test, not lost in the thread
            self.failures.append(error)

    def finish(self) -> None:
        for thread in self.threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self.threads)
        assert self.failures == []


def ledger_of(service: SecretService) -> Ledger:
    ledger = service._ledger  # (the hook goes where decisions load)
    assert isinstance(ledger, Ledger)
    return ledger


def losing_the_race(load: Callable[..., Any], other: OtherWriter) -> Callable[..., Any]:
    def load_then_lose_the_race(tenant_id: str, name: str, **kwargs: Any) -> Any:
        loaded = load(tenant_id, name, **kwargs)
        if name == HOT:
            other.store_meanwhile()
        return loaded

    return load_then_lose_the_race


@pytest.fixture
def racing(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[SecretService, OtherWriter]]:
    """The service under test, whose every load of ``HOT`` lets the other writer store
    it once more before the decision commits."""
    service = make_service()
    ledger = ledger_of(service)
    other = OtherWriter(make_service(), lambda: ledger.holding_exclusively)
    service.store_for_tenant(ACME, HOT, "v0")
    for method in ("secret", "cached_secret"):  # (a store's first attempt uses its cache)
        monkeypatch.setattr(ledger, method, losing_the_race(getattr(ledger, method), other))
    yield service, other
    other.finish()


def success_trail(service: SecretService) -> list[tuple[str, int, str | None]]:
    with tenant(ACME):
        return [
            (entry.action, entry.details["version"], entry.user_id)
            for entry in service.audit_trail(HOT)
            if entry.result == "success"
        ]


def test_a_retrieve_that_keeps_losing_to_a_writer_returns_the_value_current_when_it_read(
    racing: tuple[SecretService, OtherWriter],
) -> None:
    service, other = racing

    with tenant(ACME, user_id="reader"):
        secret = service.retrieve(HOT)

    # Attempts 0 to 3 lost the race; the fifth was decided under the lock, so the store
    # started meanwhile could only commit after the read.
    lost = ledger_module.EXCLUSIVE_AFTER
    assert len(other.threads) == lost + 1
    other.finish()
    assert (secret.value, secret.version, secret.access_count) == (f"v{lost}", lost + 1, 1)
    latest = other.other.retrieve_for_tenant(ACME, HOT)
    assert (latest.value, latest.access_count) == (f"v{lost + 1}", 2)
    # The audit log has the read once, between the version it read and the next one.
    assert [(action, version) for action, version, _ in success_trail(service)] == [
        ("create", 1),
        *(("update", version) for version in range(2, lost + 2)),
        ("read", lost + 1),
        ("update", lost + 2),
        ("read", lost + 2),
    ]


def test_a_store_that_keeps_losing_to_another_writer_commits_under_the_lock(
    racing: tuple[SecretService, OtherWriter],
) -> None:
    service, other = racing

    with tenant(ACME, user_id="racer"):
        info = service.store(HOT, "mine")

    other.finish()
    lost = ledger_module.EXCLUSIVE_AFTER
    assert len(other.threads) == lost + 1
    assert info.version == lost + 2
    # The store started during the locked attempt came after it, on top of it.
    assert other.other.retrieve_for_tenant(ACME, HOT).version == lost + 3
    writers = {version: user for action, version, user in success_trail(service)}
    assert writers[info.version] == "racer"
    assert sorted(writers) == list(range(1, lost + 4))


def test_a_disable_that_keeps_losing_to_a_writer_commits_under_the_lock(
    racing: tuple[SecretService, OtherWriter],
) -> None:
    service, other = racing

    assert service.disable_for_tenant(ACME, HOT) is True

    other.finish()
    assert len(other.threads) == ledger_module.EXCLUSIVE_AFTER + 1
    # The store that waited for the lock found the secret disabled and left it so.
    with tenant(ACME):
        assert service.list(status="disabled")[0].name == HOT
        assert service.list(status="disabled")[0].version == ledger_module.EXCLUSIVE_AFTER + 2


def test_a_refusal_decided_under_the_lock_is_audited_and_raised(
    racing: tuple[SecretService, OtherWriter],
) -> None:
    """The locked attempt's writes commit also when it raises: here the denial it
    recorded, for a secret disabled by the last write that won the race."""
    service, other = racing
    other.disable_at = ledger_module.EXCLUSIVE_AFTER

    with tenant(ACME, user_id="reader"), pytest.raises(SecretDisabled):
        service.retrieve(HOT)

    other.finish()
    with tenant(ACME):
        reads = [
            (entry.result, entry.user_id)
            for entry in other.other.audit_trail(HOT)
            if entry.action == "read"
        ]
    assert reads == [("denied", "reader")]


def failing_commits(service: SecretService, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make the locked attempts of ``service`` end without committing (as a failed
    COMMIT leaves them: rolled back, StorageError); returns what undoes that."""
    recorder = ledger_of(service).recorder
    hold = type(recorder).exclusively

    @contextmanager
    def not_committed(self: Any) -> Iterator[bool]:
        with hold(self) as holding:
            yield holding
            self._held.cursor.execute("ROLLBACK")  # (what a failed COMMIT leaves)
        raise StorageError("the transaction did not commit")

    monkeypatch.setattr(type(recorder), "exclusively", not_committed)
    return lambda: monkeypatch.setattr(type(recorder), "exclusively", hold)


def audited_as_itself(service: SecretService) -> list[tuple[str, str | None]]:
    """Store a new secret and return its audit entries: on SQLite it takes the positions
    a transaction rolled back left free."""
    with tenant(ACME, user_id="writer"):
        service.store("cold", "c")
        return [(e.action, e.user_id) for e in service.get_audit_logs(secret_name="cold")]


def test_a_locked_read_whose_transaction_does_not_commit_leaves_no_trace(
    racing: tuple[SecretService, OtherWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the locked attempt's writes landed is known only when its transaction
    ends. When it does not commit, what the attempt cached and remembered is forgotten:
    on SQLite the positions it was given are given to the next events, which must be
    audited as themselves, not as the read that was rolled back."""
    service, other = racing
    restore = failing_commits(service, monkeypatch)
    with tenant(ACME, user_id="reader"), pytest.raises(StorageError):
        service.retrieve(HOT)
    other.finish()
    restore()

    assert audited_as_itself(service) == [("create", "writer")]
    with tenant(ACME):
        assert service.get_audit_logs(secret_name=HOT, action="read") == []
    assert other.other.retrieve_for_tenant(ACME, HOT).access_count == 1


def test_a_locked_store_whose_transaction_does_not_commit_leaves_no_trace(
    racing: tuple[SecretService, OtherWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    service, other = racing
    restore = failing_commits(service, monkeypatch)
    with tenant(ACME, user_id="racer"), pytest.raises(StorageError):
        service.store(HOT, "mine")
    other.finish()
    restore()

    assert audited_as_itself(service) == [("create", "writer")]
    with tenant(ACME):
        assert [e for e in service.audit_trail(HOT) if e.user_id == "racer"] == []
    assert other.other.retrieve_for_tenant(ACME, HOT).value == f"v{len(other.threads)}"


def test_a_thread_holding_the_lock_cannot_write_outside_its_transaction(
    make_service: MakeService,
) -> None:
    """A write of its own would wait for the thread's own lock (PostgreSQL) or roll the
    held transaction back (SQLite): it is refused, and the held writes stand."""
    service = make_service()
    service.store_for_tenant(ACME, HOT, "v0")
    ledger = ledger_of(service)
    recorder: Any = ledger.recorder
    with ledger.exclusively():
        if not ledger.holding_exclusively:
            pytest.skip("this store holds no write transaction (memory)")
        service.store_for_tenant(ACME, HOT, "v1")
        with pytest.raises(StorageError, match="outside the write transaction"):
            recorder.writing().__enter__()
    assert service.retrieve_for_tenant(ACME, HOT).value == "v1"


@pytest.mark.parametrize("backend", POSTGRES, indirect=True)
def test_threads_entering_locked_attempts_at_once_do_not_use_up_a_small_pool(
    make_service: MakeService, backend: str, tmp_path: Path, master_key: str
) -> None:
    """Each locked attempt takes a connection to read on, then one to lock with. Four
    threads doing that at once on a pool of two each took a reader and waited for the
    pool (found by review: five seconds, then StorageError): one thread of a process
    holds the lock at a time anyway, and they now take turns before the pool."""
    make_service()  # (creates the schema)
    url = shared_store_url(backend, tmp_path) + "&pool_size=2&max_overflow=0"
    service = SecretService.create(url, master_key=master_key)
    try:
        ledger = ledger_of(service)
        start = threading.Barrier(4)
        failures: list[BaseException] = []

        def store(index: int) -> None:
            start.wait()
            try:
                with ledger.exclusively():
                    service.store_for_tenant(ACME, f"s{index}", "v")
            except BaseException as error:
                failures.append(error)

        threads = [threading.Thread(target=store, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert failures == []
        with tenant(ACME):
            assert [info.name for info in service.list()] == ["s0", "s1", "s2", "s3"]
    finally:
        service.close()


HOLDER = r"""
import sys, time
from keyledger import SecretService

service = SecretService.create(sys.argv[1])
with service._ledger.exclusively():
    service.store_for_tenant("acme", "hot", "never committed")
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_a_process_killed_while_it_holds_the_write_lock_holds_no_writer_back(
    make_service: MakeService, backend: str, tmp_path: Path, master_key: str
) -> None:
    """A locked attempt holds every writer back while it runs; a process killed in the
    middle of one (SIGKILL) releases the lock with its transaction, which never commits."""
    service = make_service()
    url = shared_store_url(backend, tmp_path)
    service.store_for_tenant(ACME, HOT, "v0")
    env = {**os.environ, "KEYLEDGER_MASTER_KEY": master_key}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        waiting = threading.Thread(target=service.store_for_tenant, args=(ACME, HOT, "v1"))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()  # held back by the lock
        holder.send_signal(signal.SIGKILL)
        waiting.join(20)
        assert not waiting.is_alive()
    finally:
        holder.kill()
        holder.wait(10)
    secret = service.retrieve_for_tenant(ACME, HOT)
    assert (secret.value, secret.version) == ("v1", 2)
    with tenant(ACME):
        stores = [e.action for e in service.audit_trail(HOT) if e.action != "read"]
    assert stores == ["create", "update"]


@pytest.mark.parametrize("backend", POSTGRES, indirect=True)
def test_a_refusal_whose_audit_entry_was_lost_with_the_connection_is_not_reported_as_decided(
    racing: tuple[SecretService, OtherWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal is raised only with its audit entry committed: when the locked
    attempt's connection is lost before its COMMIT (terminated by the server here,
    right after the denial was written), the caller gets StorageError, as on the
    optimistic path, and the log has no denial."""
    service, other = racing
    other.disable_at = ledger_module.EXCLUSIVE_AFTER
    ledger = ledger_of(service)
    recorder: Any = ledger.recorder
    commit = ledger.commit

    def commit_then_lose_the_connection(*items: Any, **kwargs: Any) -> Any:
        unit = commit(*items, **kwargs)
        held = recorder._held.cursor
        if held is not None:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
                pid = held._cursor.connection.info.backend_pid
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return unit

    monkeypatch.setattr(ledger, "commit", commit_then_lose_the_connection)
    with tenant(ACME, user_id="reader"), pytest.raises(StorageError, match="lost"):
        service.retrieve(HOT)
    other.finish()

    with tenant(ACME):
        reads = [e.result for e in other.other.audit_trail(HOT) if e.action == "read"]
    assert reads == []


def test_a_decryption_failure_met_under_the_lock_is_decided_without_it(
    racing: tuple[SecretService, OtherWriter],
) -> None:
    """Explaining a decryption failure diagnoses the tenant, too long to keep every
    writer waiting: the locked attempt that meets one hands the decision to the next
    attempt, made without the lock, and the one after that has the lock again. Here the
    other writer compromised the secret's key version, then stored the secret again on
    the replacement: the retrieve ends with such a value, neither failing nor starving."""
    service, other = racing
    other.compromise_at = ledger_module.EXCLUSIVE_AFTER

    with tenant(ACME, user_id="reader"):
        secret = service.retrieve(HOT)

    other.finish()
    # Turn 4 compromised version 1 (its failure record lost the race to the disable and
    # enable); the locked attempt met the compromised key and let turn 5 store after
    # it; an unlocked attempt lost to turn 6; a locked one read what turns 5 and 6
    # stored (in the order they took the lock), on the replacement version.
    assert (secret.key_version, secret.value in ("v5", "v6")) == (2, True)
    with tenant(ACME):
        mine = [(e.action, e.result) for e in service.audit_trail(HOT) if e.user_id == "reader"]
    assert mine == [("read", "success")]


@pytest.mark.parametrize("backend", POSTGRES, indirect=True)
def test_a_locked_attempt_reads_on_a_connection_of_its_own(
    make_service: MakeService, backend: str, tmp_path: Path, master_key: str
) -> None:
    """A locked attempt that asked the pool for a connection to read on, with the pool's
    every connection taken, would wait for a writer that waits for its lock (found by
    review: five seconds, then StorageError). It reads on a connection it took before.
    Here the pool has two connections, and while the locked attempt decides, a store
    of the same service waits for the lock, holding the other one. (Taking the reader
    after the lock, but before deciding, passes this test too: the reviews' scripts
    show why that order loses.)"""
    make_service()  # (creates the schema)
    url = shared_store_url(backend, tmp_path) + "&pool_size=2&max_overflow=0"
    service = SecretService.create(url, master_key=master_key)
    try:
        ledger = ledger_of(service)
        other = OtherWriter(make_service(), lambda: ledger.holding_exclusively)
        service.store_for_tenant(ACME, HOT, "v0")
        same_process: list[threading.Thread] = []
        load = ledger.secret

        def load_then_lose_the_race(tenant_id: str, name: str, **kwargs: Any) -> Any:
            loaded = load(tenant_id, name, **kwargs)
            if name == HOT:
                other.store_meanwhile()
                if ledger.holding_exclusively:  # a writer of this service waits too
                    thread = threading.Thread(
                        target=service.store_for_tenant, args=(ACME, "cold", "c")
                    )
                    same_process.append(thread)
                    thread.start()
                    thread.join(HELD_BACK)
            return loaded

        vars(ledger)["secret"] = load_then_lose_the_race
        secret = service.retrieve_for_tenant(ACME, HOT)
        other.finish()
        for thread in same_process:
            thread.join(30)
        assert len(same_process) == 1
        assert not same_process[0].is_alive()
        assert secret.value == f"v{ledger_module.EXCLUSIVE_AFTER}"
        assert other.other.retrieve_for_tenant(ACME, "cold").value == "c"
    finally:
        service.close()


@pytest.mark.parametrize("backend", POSTGRES, indirect=True)
def test_a_locked_attempt_takes_its_reader_before_the_lock(
    make_service: MakeService, backend: str, tmp_path: Path, master_key: str
) -> None:
    """The order of the two connections a locked attempt takes. Had it taken the lock
    first, a writer of the same service could take the pool's last connection and wait
    for that lock, while the attempt waited for the pool to give it a reader: nothing
    moves until a timeout fails one of them. Here such a writer starts the moment the
    attempt holds the lock; the attempt holds both its connections by then, so the
    writer waits for the pool, then stores once the attempt has committed."""
    make_service()  # (creates the schema)
    url = shared_store_url(backend, tmp_path) + "&pool_size=2&max_overflow=0&lock_timeout=3"
    service = SecretService.create(url, master_key=master_key)
    try:
        ledger = ledger_of(service)
        service.store_for_tenant(ACME, HOT, "v0")
        recorder: Any = ledger.recorder
        session = recorder._session
        writers: list[threading.Thread] = []
        failures: list[BaseException] = []

        def store_cold() -> None:
            try:
                service.store_for_tenant(ACME, "cold", "c")
            except BaseException as error:  # reported below, not lost in the thread
                failures.append(error)

        @contextmanager
        def session_then_a_writer(first: bytes, fallback: bytes | None = None) -> Iterator[Any]:
            with session(first, fallback) as conn:
                if first == recorder._begin_write_statement and not writers:
                    writers.append(threading.Thread(target=store_cold))
                    writers[0].start()
                    writers[0].join(HELD_BACK)  # it takes what the pool has, then waits
                yield conn

        vars(recorder)["_session"] = session_then_a_writer
        with ledger.exclusively():
            secret = service.retrieve_for_tenant(ACME, HOT)
        writers[0].join(30)

        assert secret.value == "v0"
        assert not writers[0].is_alive()
        assert failures == []
        assert service.retrieve_for_tenant(ACME, "cold").value == "c"
    finally:
        service.close()


def test_a_snapshot_due_in_a_locked_attempt_is_taken_once_it_has_committed(
    racing: tuple[SecretService, OtherWriter],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A snapshot is written on a connection of its own, which the held transaction's
    lock would keep waiting (SQLite: up to the busy timeout): the locked attempt's store
    that reaches a snapshot version leaves the snapshot until it has committed."""
    service, other = racing
    version = ledger_module.EXCLUSIVE_AFTER + 2  # the version the locked store makes
    monkeypatch.setattr(ledger_module, "SNAPSHOT_INTERVAL", version)
    ledger = ledger_of(service)

    with tenant(ACME):
        assert service.store(HOT, "mine").version == version
    other.finish()

    assert "snapshot" not in caplog.text
    assert ledger.snapshots is not None
    (snapshot,) = ledger.snapshots.recorder.select_events(secret_id(ACME, HOT), desc=True)
    assert snapshot.originator_version == version


@contextmanager
def held_by_another_thread(
    service: SecretService, *, store: str | None = None, for_seconds: float = 30
) -> Iterator[threading.Event]:
    """Another thread runs a locked block (storing ``HOT`` as ``store``, if given) until
    the yielded event is set or ``for_seconds`` pass; skips the test where the store
    holds no write transaction (memory)."""
    ledger = ledger_of(service)
    inside, leave = threading.Event(), threading.Event()
    holding = False

    def hold() -> None:
        nonlocal holding
        with ledger.exclusively():
            holding = ledger.holding_exclusively
            if store is not None:
                service.store_for_tenant(ACME, HOT, store)
            inside.set()
            leave.wait(for_seconds)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(30)
        if not holding:
            pytest.skip("this store holds no write transaction (memory)")
        yield leave
    finally:
        leave.set()
        holder.join(30)


def in_a_forked_child(work: Callable[[], object]) -> str:
    """Run ``work`` in a forked child: "done", or the error it raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            work()
            verdict = "done"
        except BaseException as error:  # reported to the parent
            verdict = f"{type(error).__name__}: {error}"
        os.write(write, verdict.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    try:
        return os.read(read, 1000).decode()
    finally:
        os.close(read)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_while_another_thread_holds_the_lock_can_write(
    make_service: MakeService,
) -> None:
    """A child forked while a thread held SQLite's write lock inherited SQLite's record
    of that lock and could never write (found by review). A fork now waits until no
    other thread holds a locked attempt; the child writes, then the parent."""
    service = make_service(settings=KeyledgerSettings(lock_timeout_seconds=2))
    service.store_for_tenant(ACME, HOT, "v0")
    with held_by_another_thread(service, store="held", for_seconds=0.5):
        verdict = in_a_forked_child(lambda: service.store_for_tenant(ACME, "child", "c"))

    assert verdict == "done"
    assert service.retrieve_for_tenant(ACME, HOT).value == "held"
    assert service.retrieve_for_tenant(ACME, "child").value == "c"


def test_an_interrupt_just_after_the_lock_was_taken_releases_it(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or a signal handler's SystemExit) can land between the statement that
    took the write lock and the block: the transaction is rolled back, not left holding
    the lock for every writer of every process (found by review on SQLite)."""
    service = make_service(settings=KeyledgerSettings(lock_timeout_seconds=2))
    other = make_service()
    service.store_for_tenant(ACME, HOT, "v0")
    ledger = ledger_of(service)
    recorder: Any = ledger.recorder
    held = recorder._held

    class InterruptedOnce(type(held)):  # type: ignore[misc]
        interrupted = False

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "cursor" and value is not None and not InterruptedOnce.interrupted:
                InterruptedOnce.interrupted = True
                raise KeyboardInterrupt
            super().__setattr__(name, value)

    monkeypatch.setattr(recorder, "_held", InterruptedOnce())
    with pytest.raises(KeyboardInterrupt), ledger.exclusively():
        pass
    if not InterruptedOnce.interrupted:
        pytest.skip("this store holds no write transaction (memory)")

    other.store_for_tenant(ACME, HOT, "v1")  # another writer: not locked out
    service.store_for_tenant(ACME, HOT, "v2")  # and this thread: not in a transaction
    assert other.retrieve_for_tenant(ACME, HOT).value == "v2"


def test_a_locked_attempt_waits_for_another_threads_one_no_longer_than_the_lock_timeout(
    make_service: MakeService,
) -> None:
    """Locked attempts of one process take turns; the wait for a turn is bounded by the
    store's lock timeout, as the wait for the lock itself is (found by review: the
    tenth in line waited ten lock timeouts)."""
    service = make_service(settings=KeyledgerSettings(lock_timeout_seconds=1))
    service.store_for_tenant(ACME, HOT, "v0")
    ledger = ledger_of(service)
    with (
        held_by_another_thread(service),
        pytest.raises(StorageError, match="lock timeout"),
        ledger.exclusively(),
    ):
        service.store_for_tenant(ACME, HOT, "v1")
    assert service.retrieve_for_tenant(ACME, HOT).value == "v0"
