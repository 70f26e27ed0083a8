"""Shared fixtures: a fresh master key and a service on every storage backend.

Adding a backend is one entry in ``_STORES``: a function from the test's tmp_path and a
store name to a database URL, whether two services opened on that URL share one store, and
the marks its tests carry (e.g. ``pytest.mark.postgres`` for a backend that needs a server).
"""

from __future__ import annotations

import itertools
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from keyledger import SecretService
from keyledger.infrastructure.settings import KeyledgerSettings


@dataclass(frozen=True)
class Store:
    """How a test reaches one storage backend."""

    url: Callable[[Path, str], str]  # (tmp_path, store name) -> database URL
    shared: bool  # True when a second service on the same URL sees the same data
    marks: tuple[pytest.MarkDecorator, ...] = ()


POSTGRES_URL = os.environ.get(
    "KEYLEDGER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
# Every test run gets its own schemas (kl_<run>_<n>), so runs on one server never collide.
RUN_ID = secrets.token_hex(3)
_schema_numbers = itertools.count(1)
_created_schemas: dict[tuple[Path, str], str] = {}


def _postgres_url(tmp: Path, name: str) -> str:
    """One schema per (test, store name): a second service on the same store shares it."""
    schema = _created_schemas.get((tmp, name))
    if schema is None:
        schema = _created_schemas[(tmp, name)] = f"kl_{RUN_ID}_{next(_schema_numbers)}"
    return f"{POSTGRES_URL}?schema={schema}"


def postgres_available() -> str | None:
    """None when the test server answers, else why not."""
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            return None
    except psycopg.Error as error:
        return str(error).strip().splitlines()[0]


def drop_schema(schema: str) -> None:
    """Drop one test schema and everything in it."""
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextmanager
def own_schema(tag: str) -> Iterator[str]:
    """The name of a schema for one test alone (``kl_<run>_<tag><n>``), dropped after it."""
    name = f"kl_{RUN_ID}_{tag}{next(_schema_numbers)}"
    yield name
    drop_schema(name)


def drop_created_schemas() -> None:
    """Drop the schemas this run created (called after each test that made some)."""
    if not _created_schemas:
        return
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        while _created_schemas:
            _, schema = _created_schemas.popitem()
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


_STORES: dict[str, Store] = {
    "memory": Store(url=lambda tmp, name: "memory:", shared=False),
    "sqlite": Store(url=lambda tmp, name: f"sqlite:///{tmp}/{name}.db", shared=True),
    "postgres": Store(url=_postgres_url, shared=True, marks=(pytest.mark.postgres,)),
}

BACKENDS = [pytest.param(name, id=name, marks=store.marks) for name, store in _STORES.items()]


def shared_store_url(backend: str, tmp_path: Path) -> str:
    """The URL of the store ``make_service()`` opens, for a child process to open too;
    skips the test on backends whose stores are private to one service (memory)."""
    store = _STORES[backend]
    if not store.shared:
        pytest.skip(f"{backend}: a store is private to the service that opened it")
    return store.url(tmp_path, "k")


_ENVIRONMENT = (
    "KEYLEDGER_MASTER_KEY",
    "SMRT_SECRET_MASTER_KEY",
    "KEYLEDGER_MASTER_KEY_FILE",
    "KEYLEDGER_PREVIOUS_MASTER_KEYS",
    "KEYLEDGER_DATABASE_URL",
    "KEYLEDGER_MAX_VALUE_BYTES",
    "KEYLEDGER_AUDIT_KEY",
    "KEYLEDGER_PREVIOUS_AUDIT_KEYS",
    "KEYLEDGER_AUDIT_SEAL_EVERY",
    "KEYLEDGER_GROUP_COMMIT_WAIT_MS",
)

_TEST_KEY = object()  # sentinel: "the test's master_key"


def cli_environment(
    monkeypatch: pytest.MonkeyPatch, database_url: str, master_key: str, *, create: bool = True
) -> str:
    """For a CLI test: ``database_url`` and ``master_key`` in the environment, and no
    other KEYLEDGER_ (or SMRT_SECRET_) variable; returns the URL. With ``create``, the
    store is made first, as `keyledger db init` makes it (the CLI's reading commands
    refuse a SQLite file that does not exist)."""
    for name in list(os.environ):
        if name.startswith(("KEYLEDGER_", "SMRT_SECRET_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KEYLEDGER_DATABASE_URL", database_url)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", master_key)
    if create:
        SecretService.create(database_url, master_key=master_key).close()
    return database_url


@pytest.fixture(autouse=True)
def _hermetic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test picks up a master key or database from the developer's shell."""
    for name in _ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def master_key() -> str:
    """A random 256-bit application master key, as 64 hex characters."""
    return secrets.token_hex(32)


@pytest.fixture(scope="session")
def _postgres_server() -> None:
    """Check the PostgreSQL test server once: CI must have it, elsewhere tests skip."""
    problem = postgres_available()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but PostgreSQL is unreachable at {POSTGRES_URL}: {problem}")
    pytest.skip(f"PostgreSQL unreachable ({problem}); start it or set KEYLEDGER_TEST_POSTGRES_URL")


@pytest.fixture
def schema(_postgres_server: None) -> Iterator[str]:
    """A PostgreSQL schema of this test alone, dropped afterwards."""
    with own_schema("t") as name:
        yield name


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The name of the storage backend under test."""
    name = str(request.param)
    if name == "postgres":
        request.getfixturevalue("_postgres_server")
    yield name
    if name == "postgres":
        drop_created_schemas()


MakeService = Callable[..., SecretService]


@pytest.fixture
def make_service(backend: str, tmp_path: Path, master_key: str) -> Iterator[MakeService]:
    """Open services on the test's store; every one is closed after the test.

    ``make_service()`` opens (another) service on the test's store with the test's master
    key. ``master_key=None`` opens one without any master key; ``settings=`` passes
    KeyledgerSettings; ``fresh_store=True`` opens a separate, empty store. Asking for a
    second service on the same store skips the test on backends whose stores are private
    to one service (memory).
    """
    store = _STORES[backend]
    test_master_key = master_key
    opened: list[SecretService] = []
    state = {"main_store_open": False, "fresh": 0}

    def make(
        *,
        master_key: object = _TEST_KEY,
        settings: KeyledgerSettings | None = None,
        fresh_store: bool = False,
    ) -> SecretService:
        key = test_master_key if master_key is _TEST_KEY else master_key
        assert key is None or isinstance(key, str)
        if fresh_store:
            state["fresh"] += 1
            url = store.url(tmp_path, f"fresh-{state['fresh']}")
        else:
            if state["main_store_open"] and not store.shared:
                pytest.skip(f"{backend}: a store is private to the service that opened it")
            state["main_store_open"] = True
            url = store.url(tmp_path, "k")
        service = SecretService.create(url, master_key=key, settings=settings)
        opened.append(service)
        return service

    yield make
    for service in reversed(opened):
        service.close()
    drop_created_schemas()


@pytest.fixture
def service(make_service: MakeService) -> SecretService:
    """A service with the test's master key on a fresh store of each backend."""
    return make_service()


def run_around(
    service: SecretService, statement: str, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """One statement (``?`` placeholders) on the service's database through a connection
    of its own, around keyledger, as an operator's hand edit or query would run; its
    rows, if any."""
    env = service._ledger.env
    schema = env.get("POSTGRES_SCHEMA")
    if schema:
        with psycopg.connect(
            host=env.get("POSTGRES_HOST"),
            port=env.get("POSTGRES_PORT"),
            user=env.get("POSTGRES_USER"),
            password=env.get("POSTGRES_PASSWORD") or None,
            dbname=env.get("POSTGRES_DBNAME"),
            options=f"-c search_path={schema}",
            autocommit=True,
            connect_timeout=5,
        ) as conn:
            cursor = conn.execute(statement.replace("?", "%s"), params)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    name = str(env.get("SQLITE_DBNAME"))
    db = sqlite3.connect(name, uri=name.startswith("file:"), timeout=30, isolation_level=None)
    try:
        rows = db.execute(statement, params)
        return [tuple(row) for row in rows.fetchall()] if rows.description else []
    finally:
        db.close()
