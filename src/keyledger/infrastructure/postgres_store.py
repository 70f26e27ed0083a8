"""PostgreSQL persistence: the library's recorder extended with one-transaction writes.

A write takes the events table's EXCLUSIVE lock (as the library does, so notification ids
commit in order and a reader never skips one that commits later), checks the versions the
decision was based on, appends the events, inserts key material, projects the inline read
models and commits: one transaction, read-your-writes across processes and hosts. The
library's ``insert_events`` is replaced as a whole, never hooked: its pipeline re-raises a
hook's exception only after committing (see DESIGN.md).

The events table refuses UPDATE, DELETE and TRUNCATE by trigger: the stream is
append-only in the database itself, whatever the client.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresFactory,
)
from psycopg import Connection
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed, Identifier

from keyledger.errors import StorageError
from keyledger.infrastructure.unit_writer import check_expected, write_unit_rest
from keyledger.infrastructure.write_unit import WriteUnit
from keyledger.projections.schema import schema_statements

# One advisory lock id for schema changes: processes creating tables at once take turns.
SCHEMA_LOCK_ID = 0x6B6C_6564_6765_72  # "kledger"


@lru_cache(maxsize=512)
def _to_psycopg(statement: str, named: bool) -> str:
    escaped = statement.replace("%", "%%")
    if named:
        return re.sub(r":(\w+)", r"%(\1)s", escaped)
    return escaped.replace("?", "%s")


class PgCursor:
    """A psycopg cursor speaking the projections' dialect: ``?``/``:name``, tuple rows."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def execute(self, statement: str, params: Any = ()) -> None:
        named = isinstance(params, Mapping)
        self._cursor.execute(_to_psycopg(statement, named), params)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()


def append_only_statements(table: str) -> list[str]:
    """The trigger that makes the events table refuse UPDATE, DELETE and TRUNCATE."""
    return [
        "CREATE OR REPLACE FUNCTION kl_refuse_event_change() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
        "'the keyledger event stream is append-only: % refused', TG_OP "
        "USING ERRCODE = 'insufficient_privilege'; END $$",
        f"CREATE OR REPLACE TRIGGER kl_events_append_only BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION kl_refuse_event_change()",
        f"CREATE OR REPLACE TRIGGER kl_events_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION kl_refuse_event_change()",
    ]


class _PostgresSchemaMixin:
    """Connections with the schema on their search path; tables created under a lock."""

    datastore: Any
    sql_create_statements: list[Composed]

    @contextmanager
    def _connection(self) -> Iterator[Connection[Any]]:
        with self.datastore.get_connection() as conn:
            if not getattr(conn, "_keyledger_ready", False):
                conn.execute(SQL("SET search_path TO {}").format(Identifier(self.schema)))
                conn._keyledger_ready = True
            yield conn

    @property
    def schema(self) -> str:
        return str(self.datastore.schema)

    def extra_create_statements(self) -> list[str]:
        return []

    def create_table(self) -> None:
        try:
            with self._connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_ID,))
                conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(self.schema)))
                for statement in self.sql_create_statements:
                    text = statement.as_string(conn)
                    # The library's composite types and insert function serve its optional
                    # database functions, which keyledger does not use.
                    if "CREATE TYPE" not in text and "FUNCTION" not in text:
                        conn.execute(statement, prepare=False)
                for text in self.extra_create_statements():
                    conn.execute(text.encode(), prepare=False)
        except PersistenceError as error:
            raise StorageError(f"PostgreSQL schema creation failed: {error}") from None


class KeyledgerPostgresSnapshotRecorder(_PostgresSchemaMixin, PostgresAggregateRecorder):
    """The library's snapshot recorder, creating its table under the schema lock."""


class KeyledgerPostgresRecorder(_PostgresSchemaMixin, PostgresApplicationRecorder):
    """Application recorder whose ``insert_events`` is the whole write unit."""

    position_column = "notification_id"

    def extra_create_statements(self) -> list[str]:
        return [
            *schema_statements("postgres"),
            *append_only_statements(self.events_table_name),
        ]

    @staticmethod
    def id_param(aggregate_id: UUID) -> UUID:
        return aggregate_id

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        unit: WriteUnit = kwargs.get("unit") or WriteUnit()
        select_version = (
            f"SELECT MAX(originator_version) FROM {self.events_table_name} WHERE originator_id=?"
        )
        insert = (
            f"INSERT INTO {self.events_table_name} "
            "(originator_id, originator_version, topic, state) VALUES (?,?,?,?) "
            "RETURNING notification_id"
        )
        with self.writing() as cur:

            def version_of(aggregate_id: UUID) -> int:
                cur.execute(select_version, (aggregate_id,))
                return int(cur.fetchone()[0] or 0)

            check_expected(unit, version_of)
            ids: list[int] = []
            for event in stored_events:
                cur.execute(
                    insert,
                    (event.originator_id, event.originator_version, event.topic, event.state),
                )
                ids.append(int(cur.fetchone()[0]))
            write_unit_rest(cur, unit, ids)
        return ids

    def wait_for_events(self, seconds: float) -> None:
        """LISTEN on the events channel (the library NOTIFYs it on every append)."""
        with _translated(), self._connection() as conn:
            conn.execute(SQL("LISTEN {}").format(Identifier(self.channel_name)))
            try:
                for _ in conn.notifies(timeout=seconds, stop_after=1):
                    break
            finally:
                conn.execute(SQL("UNLISTEN {}").format(Identifier(self.channel_name)))

    @contextmanager
    def reading(self) -> Iterator[PgCursor]:
        with _translated(), self._connection() as conn, conn.transaction(force_rollback=True):
            raw = conn.cursor(row_factory=tuple_row)
            raw.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield PgCursor(raw)

    @contextmanager
    def writing(self) -> Iterator[PgCursor]:
        with _translated(), self._connection() as conn, conn.transaction():
            raw = conn.cursor(row_factory=tuple_row)
            for statement in self.lock_table_statements:
                raw.execute(statement)
            raw.execute(SQL("NOTIFY {}").format(Identifier(self.channel_name)))
            yield PgCursor(raw)


@contextmanager
def _translated() -> Iterator[None]:
    """Driver and pool failures become ``StorageError``; conflicts stay ``IntegrityError``."""
    try:
        yield
    except IntegrityError:
        raise
    except psycopg.errors.UniqueViolation as error:
        raise IntegrityError(str(error)) from None
    except (OperationalError, InterfaceError, psycopg.OperationalError) as error:
        raise StorageError(
            f"PostgreSQL unavailable or lock timeout: {_first_line(error)}"
        ) from None
    except (PersistenceError, psycopg.Error) as error:
        raise StorageError(f"PostgreSQL error: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class KeyledgerPostgresFactory(PostgresFactory):
    """Infrastructure factory selected with PERSISTENCE_MODULE (see composition.py)."""

    application_recorder_class = KeyledgerPostgresRecorder
    aggregate_recorder_class = KeyledgerPostgresSnapshotRecorder
