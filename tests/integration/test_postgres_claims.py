"""Claims of docs/postgresql.md about who waits for whom, checked on a real server.

- "Reads of the read models never take the lock and never wait for writers" (Lock timeout).
- A rebuild is "built aside ...; readers and writers carry on against the live tables"
  (Rebuilding).

Each test has its own schema (kl_<run>_t<n>), dropped afterwards. A wait would show: the
services under test get a lock timeout of a few seconds, and every call runs in a helper
thread with a time limit well under it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conftest import POSTGRES_URL
from keyledger import SecretService, StorageError, super_admin, tenant
from keyledger.application import read_models
from keyledger.infrastructure.settings import KeyledgerSettings
from threaded import Outcome, timed

pytestmark = pytest.mark.postgres

LOCK_TIMEOUT = 3  # seconds a write of the services under test waits for the table lock
PROMPT = 1.0  # a read or write that does not wait answers well within this
EVERYTHING = 1_000_000


def prompt(outcome: Outcome) -> Any:
    """The call's value, insisting it answered within PROMPT seconds without an error."""
    assert outcome.seconds is not None, f"{outcome.label} still waits after {PROMPT} s"
    assert outcome.error is None, outcome
    assert outcome.seconds < PROMPT, outcome
    return outcome.value


@pytest.fixture
def url(schema: str) -> str:
    return f"{POSTGRES_URL}?schema={schema}"


@pytest.fixture
def open_service(url: str, master_key: str) -> Iterator[Callable[[], SecretService]]:
    """Open services on the test's schema with a short lock timeout; all closed after it."""
    opened: list[SecretService] = []
    settings = KeyledgerSettings(lock_timeout_seconds=LOCK_TIMEOUT)

    def make() -> SecretService:
        service = SecretService.create(url, master_key=master_key, settings=settings)
        opened.append(service)
        return service

    yield make
    for service in reversed(opened):
        service.close()


@contextmanager
def events_table_locked(service: SecretService) -> Iterator[None]:
    """Another client holds the events table in EXCLUSIVE mode, as every writer does, in an
    open transaction until the block ends."""
    schema = service._ledger.env.get("POSTGRES_SCHEMA")
    table = service._ledger.store.events_table_name
    assert schema
    assert table
    with psycopg.connect(POSTGRES_URL, connect_timeout=5, application_name="kl-claims-lock") as c:
        c.execute("SET lock_timeout = '5s'")
        c.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.Identifier(schema, table)))
        try:
            yield
        finally:
            c.rollback()


def audit(service: SecretService) -> list[Any]:
    with super_admin():
        return service.get_audit_logs(limit=EVERYTHING)


# -- reads never wait for writers -------------------------------------------------------


def test_reads_of_the_read_models_answer_while_a_writer_holds_the_table_lock(
    open_service: Callable[[], SecretService],
) -> None:
    """docs/postgresql.md, Lock timeout: listing, exists, categories, the key inventory and
    ``projections status`` never take the lock and never wait for writers; an audit query
    that finds the audit model behind catches it up under the maintainers' advisory lock,
    not the table lock, so it does not wait either."""
    service = open_service()
    for name, category in (("db", "database"), ("api", "web"), ("cdn", "web")):
        service.store_for_tenant("acme", name, f"value of {name}", category=category)
    service.retrieve_for_tenant("acme", "db")
    service.rotate_key_for_tenant("acme")
    service.store_for_tenant("globex", "db", "other")
    service.catch_up_read_models()
    service.retrieve_for_tenant("acme", "api")  # the audit model is now behind by this read
    listed = service.list_for_tenant("acme")
    keys = service.list_keys("acme")
    position, head = service.read_model_status()["audit"]
    assert head - position == 1

    # A second service that has cached nothing: every answer comes from the store.
    reader = open_service()

    def exists() -> tuple[bool, bool]:
        with tenant("acme"):
            return reader.exists("cdn"), reader.exists("nope")

    def categories() -> list[str]:
        with tenant("acme"):
            return reader.categories()

    def all_keys() -> list[Any]:
        with super_admin():
            return reader.list_keys()

    with events_table_locked(service):
        # The lock is real: a writer waits for it until its lock timeout, then fails.
        started = time.monotonic()
        with pytest.raises(StorageError, match="lock timeout"):
            reader.store_for_tenant("acme", "blocked", "v")
        assert time.monotonic() - started >= LOCK_TIMEOUT - 0.5

        assert prompt(timed("list", lambda: reader.list_for_tenant("acme"), PROMPT)) == listed
        assert prompt(timed("exists", exists, PROMPT)) == (True, False)
        assert prompt(timed("categories", categories, PROMPT)) == ["database", "web"]
        assert prompt(timed("list_keys", lambda: reader.list_keys("acme"), PROMPT)) == keys
        assert len(prompt(timed("all keys", all_keys, PROMPT))) == len(keys) + 1
        status = prompt(timed("status", reader.read_model_status, PROMPT))
        assert status["audit"] == (position, head)
        # Behind by one event: the audit query catches up first, without the table lock.
        entries = prompt(timed("audit", lambda: audit(reader), PROMPT))
        assert len(entries) == head
        assert (entries[0].action, entries[0].secret_name) == ("read", "api")
        assert reader.read_model_status()["audit"] == (head, head)

    assert audit(service) == entries
    assert service.list_for_tenant("acme") == listed  # nothing was written under the lock


# -- a rebuild is built aside --------------------------------------------------------------


def test_readers_and_writers_carry_on_during_the_bulk_of_a_rebuild(
    open_service: Callable[[], SecretService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/postgresql.md, Rebuilding: the new tables are filled in batches of 1,000 events,
    each its own transaction, while readers and writers carry on against the live tables;
    the switch replays what was appended meanwhile.

    Another service stores, retrieves and lists (a) from the rebuild's progress callback
    after its first batch and (b) while its second batch's transaction is open (its page
    read, the maintainers' lock held). Each call must answer promptly, and the rebuilt
    read models must include what was written meanwhile."""
    service = open_service()
    names = [f"s{i:02}" for i in range(40)]
    for name in names:
        service.store_for_tenant("acme", name, f"value of {name}")

    def read_many(worker: int) -> None:
        for i in range(75):
            service.retrieve_for_tenant("acme", names[(worker + i) % len(names)])

    with ThreadPoolExecutor(8) as pool:  # concurrent reads share transactions: quick to build
        list(pool.map(read_many, range(40)))
    head = service.read_model_status()["catalog"][1]
    assert head >= 3_000 + len(names) + 1  # the bulk has at least three full batches

    other = open_service()  # the readers and writers that carry on
    other.list_for_tenant("acme")  # its pool is open and warm

    def carry_on(label: str) -> dict[str, Any]:
        """Store a new secret, retrieve an old one and list, each within PROMPT seconds."""
        calls: dict[str, Callable[[], Any]] = {
            "store": lambda: other.store_for_tenant("acme", f"during-{label}", "fresh"),
            "retrieve": lambda: other.retrieve_for_tenant("acme", "s07"),
            "list": lambda: other.list_for_tenant("acme", limit=1000),
        }
        return {
            what: prompt(timed(f"{label} {what}", call, PROMPT)) for what, call in calls.items()
        }

    rebuilder = threading.get_ident()
    real_page = read_models._page
    seen: dict[str, Any] = {"pages": 0, "progress": []}

    def page_then_carry_on(ledger: Any, cur: Any, after: int) -> list[tuple[int, object]]:
        page = real_page(ledger, cur, after)
        if threading.get_ident() == rebuilder:
            seen["pages"] += 1
            if seen["pages"] == 2:  # the second batch, in its open transaction
                assert seen["progress"] == [1_000]  # the bulk: the switch comes later
                seen["inside"] = carry_on("inside")
        return page

    def progress(count: int) -> None:
        seen["progress"].append(count)
        if len(seen["progress"]) == 1:  # between the first batch and the second
            seen["between"] = carry_on("between")

    monkeypatch.setattr(read_models, "_page", page_then_carry_on)
    replayed = service.rebuild_read_models(progress=progress)

    assert {"between", "inside"} <= set(seen)
    assert replayed == sum(seen["progress"]) == head + 4  # the four writes meanwhile too
    for label in ("between", "inside"):
        assert seen[label]["retrieve"].value == "value of s07"
        listed_then = {info.name for info in seen[label]["list"]}
        assert f"during-{label}" in listed_then  # its own store, read back at once
    after = {info.name: info for info in other.list_for_tenant("acme", limit=1000)}
    assert set(after) == {*names, "during-between", "during-inside"}
    assert after["s07"].access_count == seen["inside"]["retrieve"].access_count
    assert after["s07"].access_count == seen["between"]["retrieve"].access_count + 1
    assert after["during-between"].access_count == after["during-inside"].access_count == 0
    assert after == {info.name: info for info in service.list_for_tenant("acme", limit=1000)}
    entries = audit(service)
    assert len(entries) == head + 4
    assert [(e.action, e.secret_name) for e in entries[:4]] == [
        ("read", "s07"),
        ("create", "during-inside"),
        ("read", "s07"),
        ("create", "during-between"),
    ]
    assert service.retrieve_for_tenant("acme", "during-inside").value == "fresh"
