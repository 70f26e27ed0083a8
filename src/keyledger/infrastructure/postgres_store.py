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

import logging
import re
import select
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from functools import lru_cache
from typing import Any, Literal, TypeVar
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
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg_pool import PoolClosed

from keyledger.domain.secret import Secret
from keyledger.errors import STORE_CLOSED, ShredIncomplete, StorageError
from keyledger.infrastructure import pg_fork, unit_writer
from keyledger.infrastructure.held_writes import (
    WRITE_OUTSIDE,
    HoldsWrites,
    PinnedReader,
    holding,
    in_savepoint,
)
from keyledger.infrastructure.lost_tables import settle_recreated
from keyledger.infrastructure.pg_arrays import (
    array_elements,
    bytea_array,
    int8_array,
    text_array,
    uuid_array,
)
from keyledger.infrastructure.pg_functions import (
    APPEND_READ_FUNCTION,
    APPEND_READS_FUNCTION,
    APPEND_UNIT_FUNCTION,
    BEGIN_WRITE_FUNCTION,
    CREATED_ROW_PARAMETERS,
    STALE_SQLSTATE,
    STORE_CREATED_FUNCTION,
    STORE_UPDATED_FUNCTION,
    STORED_ROW_PARAMETERS,
    append_only_statements,
    function_statements,
)
from keyledger.infrastructure.pg_prepared import (
    PreparedCall,
    binary,
    bool_value,
    int8,
    int8_value,
)
from keyledger.infrastructure.pg_vacuum_report import ServerNotice, kept_row_versions
from keyledger.infrastructure.read_events import PendingRead
from keyledger.infrastructure.unit_writer import (
    check_expected,
    stale_version,
    write_reads,
    write_unit_rest,
)
from keyledger.infrastructure.write_unit import StaleStateError, WriteUnit
from keyledger.projections.catalog import ARRAY_BATCH_MIN, CatalogProjector
from keyledger.projections.schema import schema_statements

logger = logging.getLogger(__name__)
T = TypeVar("T")

# One advisory lock id for schema changes: processes creating tables at once take turns.
SCHEMA_LOCK_ID = 0x6B6C_6564_6765_72  # "kledger"


@lru_cache(maxsize=512)
def _to_psycopg(statement: str, named: bool) -> str:
    """``?`` and ``:name`` placeholders as psycopg's. A ``?`` followed by a cast (``?::``,
    the arrays of the batch statements) is sent in binary: dumping long arrays as text
    costs psycopg a regular-expression search per element, binary does not."""
    escaped = statement.replace("%", "%%")
    if named:
        return re.sub(r":(\w+)", r"%(\1)s", escaped)
    return escaped.replace("?::", "%b::").replace("?", "%s")


class PgCursor:
    """A psycopg cursor speaking the projections' dialect: ``?``/``:name``, tuple rows."""

    dialect = "postgres"
    prepare: bool | None = None  # psycopg's choice; see _PipelineCursor

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def execute(self, statement: str, params: Any = ()) -> None:
        named = isinstance(params, Mapping)
        self._cursor.execute(_to_psycopg(statement, named), params, prepare=self.prepare)

    def execute_native(self, statement: str, params: Any = ()) -> None:
        """A statement already in psycopg's placeholders."""
        self._cursor.execute(statement, params)

    def executemany(self, statement: str, params: Any) -> None:
        named = bool(params) and isinstance(params[0], Mapping)
        self._cursor.executemany(_to_psycopg(statement, named), params)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()


class _PipelineCursor(PgCursor):
    """A cursor for statements queued in a pipeline: each statement gets a psycopg cursor
    of its own, so a result asked for with ``fetch_later`` is read once the pipeline has
    synced, without a round trip of its own (``fetchone`` still works, at that cost).

    Its statements are prepared by psycopg after a few uses (a third less server time per
    write unit). A pipeline the server aborts therefore costs its connection: see
    ``KeyledgerPostgresRecorder._abandon``."""

    def __init__(self, conn: Connection[Any]) -> None:
        self._conn = conn
        super().__init__(conn.cursor(row_factory=tuple_row))
        self._deferred: list[tuple[psycopg.Cursor[Any], Callable[[Any], None]]] = []

    def execute(self, statement: str, params: Any = ()) -> None:
        self._cursor = self._conn.cursor(row_factory=tuple_row)
        super().execute(statement, params)

    def executemany(self, statement: str, params: Any) -> None:
        self._cursor = self._conn.cursor(row_factory=tuple_row)
        super().executemany(statement, params)

    def fetch_later(self, use: Callable[[Any], None]) -> None:
        """Call ``use(row)`` with the last statement's first row once the pipeline synced."""
        self._deferred.append((self._cursor, use))

    def run_deferred(self) -> None:
        for cursor, use in self._deferred:
            use(cursor.fetchone())


class _PostgresSchemaMixin:
    """Connections with the schema on their search path; tables created under a lock."""

    datastore: Any
    sql_create_statements: list[Composed]

    @contextmanager
    def _connection(self) -> Iterator[Connection[Any]]:
        # Every pooled connection starts with the schema on its search path and a lock
        # timeout (see KeyledgerPostgresFactory), so no statement is needed here.
        with self.datastore.get_connection() as conn:
            yield conn

    def _pooled(self) -> _Pooled:
        """A pooled connection straight from the pool (``getconn``/``putconn``), for the
        one-round-trip writes: the library's ``get_connection`` wraps the pool's own
        context manager and translates errors, a third of the client time of the lone
        read's call (13 against 4.7 us here). Its callers translate errors themselves; the
        pool rolls back or replaces a connection returned mid-transaction or broken."""
        return _Pooled(self)

    @contextmanager
    def _session(self, first: bytes, fallback: bytes | None = None) -> Iterator[Connection[Any]]:
        """A connection whose ``first`` statement (a BEGIN) succeeded, or, where ``first``
        met a missing table, its ``fallback``.

        A pooled connection the server has dropped fails on its first statement, before
        any work was sent: it is discarded, the pool checks its idle connections, and the
        transaction starts again on a live one.
        """
        for attempt in range(3):
            stack = ExitStack()
            conn = stack.enter_context(self._connection())
            try:
                try:
                    conn.execute(first)
                except psycopg.errors.UndefinedTable:
                    if fallback is None:
                        raise
                    conn.execute(b"ROLLBACK")
                    conn.execute(fallback)
            except psycopg.OperationalError:
                broken = conn.closed or conn.broken
                stack.close()  # a broken connection is discarded by the pool
                if attempt == 2 or not broken:
                    raise  # a lock timeout (or any live-connection error) is final
                self.datastore.pool.check()
                continue
            except BaseException:  # (an interrupt during the BEGIN: the connection goes back)
                stack.close()
                raise
            with stack:
                yield conn
            return

    def select_events(self, originator_id: Any, **kwargs: Any) -> Any:
        """The library's select, without its ten retries of every OperationalError.

        Those retries turn one lock timeout into ten (minutes, with a production timeout);
        here a lock timeout is final, and a connection the server dropped is retried once
        after the pool checked its idle connections.
        """
        select = getattr(PostgresAggregateRecorder.select_events, "__wrapped__")  # noqa: B009
        try:
            return select(self, originator_id, **kwargs)
        except (OperationalError, InterfaceError) as error:
            if isinstance(error.__cause__, psycopg.errors.LockNotAvailable):
                raise StorageError(f"PostgreSQL lock timeout: {_first_line(error)}") from None
            self.datastore.pool.check()
        return select(self, originator_id, **kwargs)

    @property
    def schema(self) -> str:
        return str(self.datastore.schema)

    def extra_create_statements(self) -> list[str]:
        return []

    def _settle_recreated(self, conn: Connection[Any], present: set[str]) -> None:
        """After creating tables, ``present`` the tables there before (see lost_tables)."""

    def create_table(self) -> None:
        try:
            with self._connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_ID,))
                conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(self.schema)))
                tables = conn.cursor(row_factory=tuple_row).execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = %s", (self.schema,)
                )
                present = {str(row[0]) for row in tables}
                for statement in self.sql_create_statements:
                    # The library's composite types have no IF NOT EXISTS: a savepoint
                    # absorbs "already exists".
                    with suppress(psycopg.errors.DuplicateObject), conn.transaction():
                        conn.execute(statement, prepare=False)
                for text in self.extra_create_statements():
                    conn.execute(text.encode(), prepare=False)
                self._settle_recreated(conn, present)
            self.datastore.register_type_adapters()
        except (OperationalError, InterfaceError):
            raise  # no connection (the server down, say): the caller says it cannot open
        except PersistenceError as error:
            raise StorageError(f"PostgreSQL schema creation failed: {error}") from None


class KeyledgerPostgresSnapshotRecorder(_PostgresSchemaMixin, PostgresAggregateRecorder):
    """The library's snapshot recorder, creating its table under the schema lock."""


class KeyledgerPostgresRecorder(HoldsWrites, _PostgresSchemaMixin, PostgresApplicationRecorder):
    """Application recorder whose ``insert_events`` is the whole write unit."""

    position_column = "notification_id"
    dialect: Literal["sqlite", "postgres"] = "postgres"

    def extra_create_statements(self) -> list[str]:
        return [
            *schema_statements("postgres"),
            *append_only_statements(self.events_table_name),
            *function_statements(self.events_table_name, self.channel_name),
        ]

    def _settle_recreated(self, conn: Connection[Any], present: set[str]) -> None:
        def run(statement: str, params: tuple[Any, ...]) -> list[Any]:
            cur = conn.cursor(row_factory=tuple_row)
            cur.execute(_to_psycopg(statement, False).encode(), params, prepare=False)
            return cur.fetchall() if cur.description is not None else []

        settle_recreated(run, present, self.events_table_name)

    @staticmethod
    def id_param(aggregate_id: UUID) -> UUID:
        return aggregate_id

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        unit: WriteUnit = kwargs.get("unit") or WriteUnit()
        events = list(stored_events)
        held = self._held.cursor
        if held is not None:  # this thread holds a write transaction (see exclusively)
            return self._in_held(
                held,
                lambda cur: self._write_unit(cur, events, unit),
                events[0] if events else None,
            )
        function = self._store_function(events, unit)
        if function is not None:
            position = self._in_one_round_trip(
                lambda conn: self._call_store(conn, function, events[0], unit),
                committed=lambda: self._committed(events[0]),
                lost_after_commit="PostgreSQL connection lost after the write was committed",
            )
            if position is not None:
                return [position]
        if self._unit_pipeline and not unit.require_unused:

            def send(conn: Connection[Any], *, begin: bool) -> list[int]:
                try:
                    return self._unit_in_pipeline(conn, events, unit, begin=begin)
                except BaseException as error:
                    if _answered(conn):  # (closed by the caller: see _abandon)
                        self._after_failed_unit(error)
                    raise

            # The whole unit, BEGIN to COMMIT, in one round trip where that is safe;
            # else the BEGIN first, then the rest: two round trips.
            positions = self._in_one_round_trip(
                lambda conn: send(conn, begin=True),
                committed=lambda: self._committed(events[0]) if events else None,
                lost_after_commit="PostgreSQL connection lost after the write was committed",
                abandon_on_error=True,
            )
            if positions is not None:
                return positions
            if self._unit_pipeline:
                return self._begin_first(
                    lambda conn: send(conn, begin=False),
                    committed=lambda: self._committed(events[0]) if events else None,
                    lost_after_commit="PostgreSQL connection lost after the write was committed",
                    abandon_on_error=True,
                )
        # Units that decide on what they read under the lock (require_unused), and
        # schemas without the function: one statement at a time.
        with self.writing() as cur:
            return self._write_unit(cur, events, unit)

    def _write_unit(self, cur: PgCursor, events: list[StoredEvent], unit: WriteUnit) -> list[int]:
        """A write unit one statement at a time, in a transaction that holds the lock."""
        check_expected(unit, lambda ids: self._versions(cur, ids))
        positions = self._append(cur, events)
        write_unit_rest(cur, unit, positions)
        return positions

    @contextmanager
    def exclusively(self) -> Iterator[bool]:
        """This thread's writes, until the block ends, in one transaction that takes the
        events-table lock first, and its reads on another pooled connection taken before
        that (see held_writes): what the block reads cannot move on before it commits.
        It commits when the block ends, also when the block raises (what its writes made,
        as each would have committed alone). Yields False, holding nothing, when the
        pool has a single connection and when this thread holds one already."""
        if self._held.cursor is not None or getattr(self.datastore.pool, "max_size", 0) < 2:
            yield False
            return
        with (
            self._gate.held(self.datastore.lock_timeout or 30),
            _translated(),
            self._connection() as reader,
            self._session(self._begin_write_statement) as conn,
        ):
            backend = conn.info.backend_pid
            self._held.first_event = None
            with holding(
                self._held,
                _pinned(self.datastore),
                PgCursor(conn.cursor(row_factory=tuple_row)),
                reader,
                lambda: self._end_held(conn, backend),
            ) as held:
                yield held

    def _end_held(self, conn: Connection[Any], backend: int) -> StorageError | None:
        """COMMIT a held transaction: None, or why it did not (or may not have). A lost
        answer is settled as every write's is (``_settle_lost``)."""
        try:
            conn.execute("COMMIT")
            return None
        except psycopg.Error as error:
            if not (conn.broken or conn.closed):
                return StorageError(f"PostgreSQL did not commit: {_first_line(error)}")
        first = self._held.first_event
        try:
            self._settle_lost(
                backend,
                lambda: self._committed(first) if first is not None else False,
                "PostgreSQL connection lost after the write was committed",
            )
        except StorageError as lost:
            return lost
        return StorageError("PostgreSQL connection lost before the write was committed")

    def _in_held(
        self, cur: PgCursor, write: Callable[[PgCursor], T], first: StoredEvent | None
    ) -> T:
        if self._held.first_event is None:
            self._held.first_event = first
        with _translated():
            return in_savepoint(cur, write, errors=psycopg.Error)

    _unit_pipeline = True

    _created_function = True  # kl_store_created_v1 exists (as far as we know)
    _updated_function = True  # kl_store_updated_v1 exists

    def _store_function(self, events: Sequence[StoredEvent], unit: WriteUnit) -> str | None:
        """The one-call function that writes ``unit`` whole, if there is one: a store of
        one new value and nothing else (one SecretCreated or SecretStored, at most two
        versions to check, no key material)."""
        if not (
            len(events) == 1
            and len(unit.domain_events) == 1
            and len(unit.expected) <= 2
            and not (unit.key_material or unit.material_deletions or unit.material_rewraps)
            and not unit.require_unused
        ):
            return None
        kind = type(unit.domain_events[0])
        function = (
            STORE_CREATED_FUNCTION
            if kind is Secret.SecretCreated
            else STORE_UPDATED_FUNCTION
            if kind is Secret.SecretStored
            else None
        )
        return function if function and getattr(self, _FUNCTION_FLAGS[function]) else None

    def _call_store(
        self, conn: Connection[Any], function: str, event: StoredEvent, unit: WriteUnit
    ) -> int | None:
        """A store's unit as one call of ``function``, committed by the server: its
        position; StaleStateError when the decision was stale (nothing written); None when
        the schema lacks the function (then the unit goes the generic way, and later ones
        too, with one warning)."""
        (first_id, first_version), (second_id, second_version) = [
            *unit.expected.items(),
            (None, 0),
            (None, 0),
        ][:2]
        head = (
            None if first_id is None else first_id.bytes,
            int8(first_version),
            None if second_id is None else second_id.bytes,
            int8(second_version),
            _uuid(event.originator_id).bytes,
        )
        stored = unit.domain_events[0]
        try:
            if function == STORE_CREATED_FUNCTION:
                row = CatalogProjector.created(stored, unit.outcome)
                stale, position = _STORE_CREATED_CALL.run(
                    conn,
                    (
                        *head,
                        event.topic.encode(),
                        event.state,
                        *map(binary, row, _CREATED_ROW_TYPES),
                    ),
                )
            else:
                row = CatalogProjector.stored_row(stored)
                stale, position, count, last = _STORE_UPDATED_CALL.run(
                    conn,
                    (
                        *head,
                        int8(event.originator_version),
                        event.topic.encode(),
                        event.state,
                        b"\x01" if stored.revived else b"\x00",
                        *map(binary, row, _STORED_ROW_TYPES),
                        stored.tenant_id.encode(),
                        stored.name.encode(),
                    ),
                )
                if count is not None and unit.outcome.wanted:  # as _remember_access does
                    unit.outcome.access_count = int8_value(count)
                    unit.outcome.last_accessed_at = int8_value(last)
        except psycopg.errors.UndefinedFunction:
            self._lacks(function, "stores take the pipeline")
            return None
        if bool_value(stale):
            raise StaleStateError("the store was decided on a keyring that moved on")
        return int8_value(position)

    def _in_one_round_trip(
        self,
        send: Callable[[Connection[Any]], T | None],
        *,
        committed: Callable[[], bool | None],
        lost_after_commit: str,
        abandon_on_error: bool = False,
    ) -> T | None:
        """``send(conn)``, a write that commits in its one round trip, on a pooled
        connection with nothing waiting to be read (one the server closed while it sat
        idle has its termination message pending). None when there was no such
        connection, or when it died before anything was committed: the caller then sends
        a BEGIN first, which proves a connection alive before any work.

        A single call cannot tell "dead before the send" from "died after the commit", so
        a lost connection is settled (``_settle_lost``). An error the server answered
        with (a lock timeout, say) is final: nothing was written, and it is raised as
        it is, once (with ``abandon_on_error``, after the connection is closed: see
        ``_abandon``)."""
        with _translated(), self._pooled() as conn:
            if _has_pending_input(conn):
                return None
            backend = conn.info.backend_pid
            try:
                return send(conn)
            except BaseException as error:
                if not self._lost(conn, error, abandon=abandon_on_error):
                    raise
        self._settle_lost(backend, committed, lost_after_commit)
        return None  # nothing was written: the caller sends a BEGIN first

    def _begin_first(
        self,
        send: Callable[[Connection[Any]], T],
        *,
        committed: Callable[[], bool | None],
        lost_after_commit: str,
        abandon_on_error: bool = False,
    ) -> T:
        """``send(conn)`` on a connection whose BEGIN (with the write lock) succeeded: the
        rest of the write, ending in its COMMIT. A connection lost after the BEGIN is
        settled (``_settle_lost``): the answer to the COMMIT may be what was
        lost, so whether the write is in the stream is looked up, never presumed. An
        error the server answered with is raised as in ``_in_one_round_trip``."""
        with _translated(), self._session(self._begin_write_statement) as conn:
            backend = conn.info.backend_pid
            try:
                return send(conn)
            except BaseException as error:
                if not self._lost(conn, error, abandon=abandon_on_error):
                    raise
        self._settle_lost(backend, committed, lost_after_commit)
        raise StorageError("PostgreSQL connection lost before the write was committed")

    def _lost(self, conn: Connection[Any], error: BaseException, *, abandon: bool) -> bool:
        """Whether the failed send of a write lost its connection (then the write is
        settled). An error the server answered with is final (with ``abandon``, the
        connection is closed first: see ``_abandon``)."""
        if _answered(conn):
            if abandon:
                self._abandon(conn)
            return False
        return isinstance(error, psycopg.OperationalError)

    def _settle_lost(
        self, backend: int, committed: Callable[[], bool | None], lost_after_commit: str
    ) -> None:
        """After the connection of server process ``backend`` was lost mid-write: return
        when the write is known not to be in the stream; else ``StorageError``, saying
        whether it was committed (``lost_after_commit``) or cannot be known. The process
        is ended first (else nothing is known), then ``committed()`` looks the write up."""
        self.datastore.pool.check()
        written = committed() if self._backend_gone(backend) else None
        if written is None:
            raise StorageError(
                "PostgreSQL connection lost: the write may or may not have been committed"
            )
        if written:
            raise StorageError(lost_after_commit)

    @staticmethod
    def _abandon(conn: Connection[Any]) -> None:
        """End a write pipeline the server aborted by closing its connection (the server
        rolls the transaction back; the pool replaces the connection).

        After the failure the server skipped every statement of the pipeline, PREPAREs
        included, and psycopg can still count one of them as prepared: the next use of it
        on this connection would fail with "prepared statement does not exist" (a test
        holds this). A new connection starts clean. Aborted pipelines are conflicts (a
        decision made on state that moved on), rare and retried anyway."""
        conn.close()

    def _after_failed_unit(self, error: BaseException) -> None:
        """A stale decision becomes StaleStateError; a missing function (a schema made by
        an older version) turns to the older pipeline or off, with one warning."""
        if getattr(error, "sqlstate", None) == STALE_SQLSTATE:
            raise StaleStateError(str(error)) from None
        if isinstance(error, psycopg.errors.UndefinedFunction):
            # Named by the error, not by the flags: another thread may have turned one off.
            missing = APPEND_UNIT_FUNCTION if APPEND_UNIT_FUNCTION in str(error) else None
            self._lacks(missing or BEGIN_WRITE_FUNCTION, "writes cost more")
            raise StaleStateError("retry without the function") from None

    def _lacks(self, function: str, consequence: str) -> None:
        """Note that this schema lacks ``function`` (one made by an older version): what
        it served goes the older way from now on, with one warning however many threads
        find it missing."""
        flag = _FUNCTION_FLAGS[function]
        if getattr(self, flag):
            setattr(self, flag, False)
            logger.warning(
                "%s() is missing: %s until `keyledger db init` creates it", function, consequence
            )

    _unit_function = True

    def _committed(self, event: StoredEvent) -> bool:
        """Whether this very event (same bytes) is in the stream."""
        with self.reading() as cur:
            cur.execute(
                f"SELECT state FROM {self.events_table_name} "
                "WHERE originator_id = ? AND originator_version = ?",
                (_uuid(event.originator_id), event.originator_version),
            )
            row = cur.fetchone()
        return row is not None and bytes(row[0]) == event.state

    def _unit_in_pipeline(
        self, conn: Connection[Any], events: list[StoredEvent], unit: WriteUnit, *, begin: bool
    ) -> list[int]:
        """A write unit as one pipeline: one round trip. With ``begin``, the unit is the
        pipeline's implicit transaction (the server commits it at the pipeline's sync, or
        rolls it back when a statement failed), so it needs no BEGIN and no COMMIT
        statement; else it ends the transaction the session's BEGIN opened. The version
        check raises on the server, so a stale decision aborts the transaction."""
        expected = (uuid_array(list(unit.expected)), int8_array(list(unit.expected.values())))
        use_function = self._unit_function  # read once: another thread may turn it off
        with conn.pipeline() as pipeline:
            with _closed_unless_queued(conn):
                # The lock, the notification, the version check and the append in one
                # statement (a session opened BEGIN-first holds the lock already: taking
                # it again is free).
                head = conn.cursor(row_factory=tuple_row)
                if use_function:
                    head.execute(
                        f"SELECT {APPEND_UNIT_FUNCTION}(%b, %b, %b, %b, %b, %b)",
                        (
                            *expected,
                            uuid_array([_uuid(e.originator_id) for e in events]),
                            int8_array([e.originator_version for e in events]),
                            text_array([e.topic for e in events]),
                            bytea_array([e.state for e in events]),
                        ),
                    )
                else:  # a schema made by 0.4.0: the check, then an INSERT of our own
                    head.execute(f"SELECT {BEGIN_WRITE_FUNCTION}(%b, %b)", expected)
                    if events:
                        statement, params = self._append_sql(events)
                        head = conn.cursor(row_factory=tuple_row)
                        head.execute(statement + " RETURNING notification_id", params)
                rest = _PipelineCursor(conn)
                write_unit_rest(rest, unit, [0] * len(events))  # projections ignore positions
                if not begin:
                    conn.cursor().execute("COMMIT", prepare=False)
            pipeline.sync()
            if use_function:
                row = head.fetchone()
                assert row is not None
                positions = [int(p) for p in row[0]]
            else:  # the VALUES rows are inserted, and numbered, in the order given
                positions = sorted(int(row[0]) for row in head.fetchall()) if events else []
        rest.run_deferred()
        return positions

    def insert_reads(self, batch: Sequence[PendingRead]) -> list[BaseException | None]:
        """Append a batch of reads: one round trip (``append_reads_statement``) on a
        connection known to be alive, else three (see ``_insert_reads_in_transaction``).

        A connection can still die between the liveness check and the call (the server
        terminated it a moment earlier). Whether the batch was then committed is decided
        by looking for its events, whose ids are new: none found, nothing happened and
        the batch goes the BEGIN-first way on another connection; found, the reads were
        recorded but their counts are lost with the answer, and the batch fails closed.
        """
        held = self._held.cursor
        if held is not None:  # this thread holds a write transaction (see exclusively)
            return self._in_held(
                held,
                lambda cur: write_reads(
                    cur,
                    batch,
                    versions_of=lambda ids: self._versions(cur, ids),
                    append=lambda events: self._append(cur, events),
                ),
                batch[0].stored if batch else None,
            )
        outcome = None
        if self._append_function:

            def send(conn: Connection[Any]) -> bool | None:
                if self._single_read_function and _single(batch):
                    try:
                        return self._call_append_read(conn, batch[0])
                    except psycopg.errors.UndefinedFunction:  # the batch function serves
                        self._lacks(APPEND_READ_FUNCTION, "lone reads cost the server more")
                try:
                    return self._call_append_reads(conn, batch)
                except psycopg.errors.UndefinedFunction:
                    self._lacks(APPEND_READS_FUNCTION, "reads take three round trips")
                    return None

            outcome = self._in_one_round_trip(
                send,
                committed=lambda: self._any_written(batch),
                lost_after_commit=(
                    "PostgreSQL connection lost after the reads were recorded; "
                    "their values are not returned"
                ),
            )
        if outcome is True:
            return [None] * len(batch)
        if outcome is False:  # a decision was stale: nothing was written; item by item
            return self._insert_reads_one_by_one(batch)
        return self._insert_reads_in_transaction(batch)

    def _backend_gone(self, pid: int, *, wait: float = 5.0) -> bool:
        """Whether the server process of a lost connection has ended, so that whatever it
        committed is final and can be looked up. A process still there (the client side
        died, the server side did not) is terminated; False if it is still there after
        ``wait`` seconds (or cannot be asked about): then nothing is known."""
        try:
            with self._connection() as conn:
                with suppress(psycopg.Error):  # not ours to end, or already gone
                    conn.execute(  # (only a process of this database: a pid is reused)
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE pid = %s AND datname = current_database()",
                        (pid,),
                    )
                deadline = time.monotonic() + wait
                while conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone():
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.05)
        except (psycopg.Error, PersistenceError, OperationalError, InterfaceError):
            return False
        return True

    def _any_written(self, batch: Sequence[PendingRead]) -> bool:
        with self.reading() as cur:
            cur.execute(
                f"SELECT 1 FROM {self.events_table_name} WHERE originator_id = ANY(?) LIMIT 1",
                ([_uuid(read.stored.originator_id) for read in batch],),
            )
            return cur.fetchone() is not None

    _append_function = True

    _single_read_function = True

    def _call_append_read(self, conn: Connection[Any], read: PendingRead) -> bool:
        """One call of the single-read function, committed by the server; False when the
        decision was stale (nothing written)."""
        (first_id, first_version), *more = read.expected.items()
        second_id, second_version = more[0] if more else (None, 0)
        stale, position, count = _APPEND_READ_CALL.run(
            conn,
            (
                first_id.bytes,
                int8(first_version),
                None if second_id is None else second_id.bytes,
                int8(second_version),
                _uuid(read.stored.originator_id).bytes,
                read.stored.topic.encode(),
                read.stored.state,
                read.tenant_id.encode(),
                read.secret_name.encode(),
                int8(read.at),
            ),
        )
        if bool_value(stale):
            return False
        read.position = int8_value(position)
        counted = int8_value(count)
        if counted is not None:  # None: the secret has no catalog row to count in
            read.access_count, read.last_accessed_at = counted, read.at
        return True

    def _call_append_reads(self, conn: Connection[Any], batch: Sequence[PendingRead]) -> bool:
        """One call of the append function, committed by the server; False when a
        decision was stale (nothing written)."""
        # Every read's own versions: two reads of one secret may have been decided on
        # different versions of it, and each must hold. Equal pairs (the keyring of one
        # tenant, read by every read of the batch) are checked once.
        expected = list(dict.fromkeys(pair for read in batch for pair in read.expected.items()))
        tenants, names, counts, ats = CatalogProjector.read_totals(batch)
        stale, positions, counted_tenants, counted_names, counted = _APPEND_READS_CALL.run(
            conn,
            [
                uuid_array([aggregate_id for aggregate_id, _ in expected]).data,
                int8_array([version for _, version in expected]).data,
                uuid_array([_uuid(read.stored.originator_id) for read in batch]).data,
                text_array([read.stored.topic for read in batch]).data,
                bytea_array([read.stored.state for read in batch]).data,
                text_array(tenants).data,
                text_array(names).data,
                int8_array(counts).data,
                int8_array(ats).data,
            ],
        )
        if bool_value(stale):
            return False
        for read, position in zip(batch, array_elements(positions), strict=True):
            read.position = int8_value(position)
        CatalogProjector.assign_read_outcomes(
            batch,
            list(
                zip(
                    [_text(value) for value in array_elements(counted_tenants)],
                    [_text(value) for value in array_elements(counted_names)],
                    [int8_value(value) for value in array_elements(counted)],
                    strict=True,
                )
            ),
        )
        return True

    def _insert_reads_one_by_one(self, batch: Sequence[PendingRead]) -> list[BaseException | None]:
        with self.writing() as cur:
            return write_reads(
                cur,
                batch,
                versions_of=lambda ids: self._versions(cur, ids),
                append=lambda events: self._append(cur, events),
            )

    def _insert_reads_in_transaction(
        self, batch: Sequence[PendingRead]
    ) -> list[BaseException | None]:
        """Append a batch of reads in three round trips: lock, pipeline, commit.

        The version check, the append and the access-count update are sent together in a
        pipeline, optimistically; the transaction commits only if no decision was stale.
        A stale one (rare: the secret or keyring changed since it was read) rolls the
        batch back, and the batch is written again item by item.
        """
        with _translated(), self._session(self._begin_write_statement) as conn:
            try:
                current, returned = self._pipelined_reads(conn, batch)
            except BaseException:
                with suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                raise
            if any(stale_version(read.expected, current) for read in batch):
                conn.execute("ROLLBACK")
            else:
                conn.execute("COMMIT")
                CatalogProjector.assign_read_outcomes(batch, returned)
                return [None] * len(batch)
        return self._insert_reads_one_by_one(batch)

    def _pipelined_reads(
        self, conn: Connection[Any], batch: Sequence[PendingRead]
    ) -> tuple[dict[UUID, int], list[Any]]:
        ids = list({a for read in batch for a in read.expected})
        events = [read.stored for read in batch]
        update, update_params = CatalogProjector.reads_update(batch, "postgres")
        with conn.pipeline() as pipeline:
            versions = conn.cursor(row_factory=tuple_row)
            versions.execute(
                f"SELECT originator_id, MAX(originator_version) FROM {self.events_table_name} "
                "WHERE originator_id = ANY(%s) GROUP BY originator_id",
                (ids,),
                prepare=False,  # a fallback path: never prepared (see _abandon)
            )
            conn.cursor().execute(*self._append_sql(events), prepare=False)
            counts = conn.cursor(row_factory=tuple_row)
            counts.execute(_to_psycopg(update, False), update_params, prepare=False)
            pipeline.sync()
            current = {row[0]: int(row[1]) for row in versions.fetchall()}
            returned = counts.fetchall()
        return current, returned

    def _versions(self, cur: PgCursor, aggregate_ids: list[UUID]) -> dict[UUID, int]:
        if not aggregate_ids:
            return {}
        cur.execute(
            f"SELECT originator_id, MAX(originator_version) FROM {self.events_table_name} "
            "WHERE originator_id = ANY(?) GROUP BY originator_id",
            (aggregate_ids,),
        )
        return {row[0]: int(row[1]) for row in cur.fetchall()}

    def _append(self, cur: PgCursor, events: list[StoredEvent]) -> list[int]:
        """One multi-row INSERT; positions returned in the order of ``events``."""
        if not events:
            return []
        statement, params = self._append_sql(events)
        cur.execute_native(
            statement + " RETURNING originator_id, originator_version, notification_id", params
        )
        positions = {(row[0], row[1]): int(row[2]) for row in cur.fetchall()}
        return [positions[(e.originator_id, e.originator_version)] for e in events]

    def _append_sql(self, events: Sequence[StoredEvent]) -> tuple[str, list[Any]]:
        """The INSERT of ``events`` in psycopg's placeholders: a VALUES list for a small
        batch, four binary arrays (one statement text for any size) for a large one."""
        insert = (
            f"INSERT INTO {self.events_table_name} "
            "(originator_id, originator_version, topic, state) "
        )
        if len(events) > ARRAY_BATCH_MIN:
            arrays = (  # in array order: positions follow the order of ``events``
                "unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[]) "
                "WITH ORDINALITY AS u(id, version, topic, state, n) ORDER BY n"
            )
            columns: list[Any] = [
                [e.originator_id for e in events],
                [e.originator_version for e in events],
                [e.topic for e in events],
                [e.state for e in events],
            ]
            return insert + "SELECT id, version, topic, state FROM " + arrays, columns
        values = ",".join(["(%s,%s,%s,%s)"] * len(events))
        params = [
            v for e in events for v in (e.originator_id, e.originator_version, e.topic, e.state)
        ]
        return insert + "VALUES " + values, params

    @staticmethod
    def backup(target: str) -> None:
        raise StorageError(
            "a PostgreSQL store is backed up with PostgreSQL's tools (pg_dump, or base "
            "backups with WAL archiving): see docs/operations.md, section 6"
        )

    def shred(self) -> None:
        """Rewrite the key-material table so deleted rows leave its pages.

        A plain VACUUM frees dead rows but leaves their bytes in the pages; VACUUM FULL
        writes a new table file (the table is small: one row per key version). Neither
        of its two ways to fall short raises on the server, so both are checked here:
        a role that does not own the table gets a mere notice ("skipping"), and no new
        file; and row versions that a snapshot open elsewhere may still see are copied
        into the new file (its VERBOSE report: "N dead row versions cannot be removed
        yet"). Either is ``ShredIncomplete``. Such a snapshot is most often another
        process's short read, so the shred waits for it (``SHRED_PATIENCE_SECONDS``, as on
        SQLite): it notes the transactions of the database that held a snapshot when the
        rewrite kept rows, watches them in ``pg_stat_activity`` without locking anything,
        and rewrites the table again once they have all ended. Each rewrite holds the
        table's lock (readers of key material wait for it), so there is one rewrite per
        wait, not one every few milliseconds.
        """
        deadline = time.monotonic() + unit_writer.SHRED_PATIENCE_SECONDS
        while self._vacuum_key_material():
            holders = self._snapshot_holders()
            rewrite_at = time.monotonic() + SHRED_REWRITE_SECONDS
            while time.monotonic() < deadline:
                time.sleep(SHRED_RETRY_SECONDS)
                holders &= self._snapshot_holders()
                # Holders that began after the deletion (they do not see its rows) are
                # not told apart here: a rewrite every SHRED_REWRITE_SECONDS finds out.
                if not holders or time.monotonic() >= rewrite_at:
                    break
            else:
                raise ShredIncomplete(
                    "the operation is done, but a transaction open elsewhere may still "
                    "see the key material it deleted or replaced, so VACUUM FULL kept "
                    "those rows in kl_key_material's new file: run `keyledger db shred` "
                    "once long transactions have ended"
                )

    def _snapshot_holders(self) -> set[tuple[int, Any]]:
        """The other sessions of this database that hold a snapshot: (pid, its xmin), so
        that a session's next transaction is another entry (``xact_start`` would not do:
        the server hides it from roles that are not the session's own)."""
        with _translated(), self._connection() as conn:
            rows = (
                conn.cursor(row_factory=tuple_row)
                .execute(
                    "SELECT pid, backend_xmin::text FROM pg_catalog.pg_stat_activity "
                    "WHERE datname = pg_catalog.current_database() "
                    "AND pid <> pg_catalog.pg_backend_pid() AND backend_xmin IS NOT NULL"
                )
                .fetchall()
            )
        return {(row[0], row[1]) for row in rows}

    def _vacuum_key_material(self) -> int:
        """One ``VACUUM FULL`` of the key-material table: the dead row versions it kept
        (``ShredIncomplete`` when it was skipped, or when its report could not be read:
        see pg_vacuum_report)."""
        filenode = "SELECT pg_relation_filenode('kl_key_material')"
        notices: list[ServerNotice] = []

        def on_notice(notice: psycopg.errors.Diagnostic) -> None:
            notices.append(ServerNotice.of(notice))  # (read now: psycopg frees it after)

        with _translated(), self._connection() as conn:
            english = _messages_in_english(conn)
            conn.add_notice_handler(on_notice)
            try:
                before = conn.execute(filenode).fetchone()
                conn.execute("VACUUM (FULL, VERBOSE) kl_key_material")
                after = conn.execute(filenode).fetchone()
            finally:
                conn.remove_notice_handler(on_notice)
                if english and not conn.broken:
                    with suppress(psycopg.Error):  # (left set, it changes only messages)
                        conn.execute("RESET lc_messages")
            role = conn.info.user
        if before == after:
            raise ShredIncomplete(
                "the operation is done, but VACUUM FULL of kl_key_material was skipped "
                f"(role {role!r} does not own the table): the key material it deleted "
                "or replaced stays in the table's pages until the table's owner runs "
                "`keyledger db shred` (see docs/postgresql.md, roles)"
            )
        kept = kept_row_versions(notices)
        if kept is None:
            raise ShredIncomplete(
                "the operation is done, but the report of VACUUM FULL of kl_key_material "
                "could not be read, so whether it kept deleted key material for a "
                "transaction open elsewhere is unknown: set lc_messages = 'C' for role "
                f"{role!r} (or grant it SET on lc_messages) and run `keyledger db shred`"
            )
        return kept

    def wait_for_events(self, seconds: float) -> None:
        """LISTEN on the events channel (the library NOTIFYs it on every append).

        A connection dropped while waiting (the server restarted, an administrator
        terminated it) ends the wait early instead of failing: the pool drops it, and the
        caller's next catch-up, on a fresh connection, finds whatever was appended (or
        reports the server down). The wait is taken in slices of at most
        ``LISTEN_SLICE_SECONDS``, and ends after the slice in which the store was closed:
        the connection goes back to the (closed) pool, which closes it, instead of staying
        open for the rest of an idle wait."""
        deadline = time.monotonic() + seconds
        with _translated(), self._connection() as conn:
            channel = Identifier(self.channel_name)
            try:
                conn.execute(SQL("LISTEN ") + channel)
                while not self.datastore.pool.closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    timeout = min(left, LISTEN_SLICE_SECONDS)
                    if any(True for _ in conn.notifies(timeout=timeout, stop_after=1)):
                        break
            except psycopg.OperationalError:
                if not (conn.closed or conn.broken):
                    raise
                self.datastore.pool.check()
                return
            finally:
                if not (conn.closed or conn.broken):
                    with suppress(psycopg.Error):
                        conn.execute(SQL("UNLISTEN ") + channel)

    @contextmanager
    def reading(self) -> Iterator[PgCursor]:
        # The read models locked before the snapshot is taken (LOCK takes none): a read
        # then waits for a rebuild's switch to commit and sees its tables whole, where a
        # snapshot from before the switch found a renamed-in table with no row visible.
        # (A read model dropped by hand: read without the lock; its reads fail alone.)
        with _translated(), self._session(_BEGIN_READ_LOCKED, _BEGIN_READ) as conn:
            try:
                yield PgCursor(conn.cursor(row_factory=tuple_row))
            finally:
                with suppress(psycopg.Error):
                    conn.execute("ROLLBACK")

    def writing(self) -> AbstractContextManager[PgCursor]:
        # BEGIN, the lock timeout, the table lock and the NOTIFY in one round trip.
        if self._held.cursor is not None:  # (it would wait for this thread's own lock)
            raise StorageError(WRITE_OUTSIDE)
        return self._transaction(self._begin_write_statement)

    @staticmethod
    def hold_maintainers(cur: Any) -> None:
        # The maintainers' advisory lock (``projecting``), until this transaction ends.
        cur.execute("SELECT pg_advisory_xact_lock(?)", (PROJECTION_LOCK_ID,))

    def projecting(self) -> AbstractContextManager[PgCursor]:
        # Maintainers serialise on an advisory lock, not on the events table: appends go
        # on meanwhile. Reading events by position stays safe without the table lock,
        # because writers commit positions in order (they hold it while appending).
        # Replays send many statements whose results nobody reads: pipeline them.
        if self._held.cursor is not None:  # (see writing)
            raise StorageError(WRITE_OUTSIDE)
        return self._transaction(_BEGIN_PROJECTING, pipelined=True)

    @contextmanager
    def _transaction(self, begin: bytes, *, pipelined: bool = False) -> Iterator[PgCursor]:
        """A transaction opened by ``begin``: committed, or rolled back on any exception."""
        with _translated(), self._session(begin) as conn:
            try:
                if pipelined:
                    with conn.pipeline():
                        yield PgCursor(conn.cursor(row_factory=tuple_row))
                else:
                    yield PgCursor(conn.cursor(row_factory=tuple_row))
            except BaseException:
                with suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @property
    def _begin_write_statement(self) -> bytes:
        if self._begin_write is None:
            self._begin_write = (
                f"BEGIN; SET LOCAL lock_timeout = '{int(self.datastore.lock_timeout)}s'; "
                f'LOCK TABLE "{self.events_table_name}" IN EXCLUSIVE MODE; '
                f'NOTIFY "{self.channel_name}"'
            ).encode()
        return self._begin_write

    _begin_write: bytes | None = None


_BEGIN_READ = b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# In the order a rebuild's switch locks them (application/read_models.py _SWITCH_ORDER).
_BEGIN_READ_LOCKED = (
    _BEGIN_READ + b"; LOCK TABLE kl_keys, kl_catalog, kl_audit IN ACCESS SHARE MODE"
)
# A lone read's call, on libpq's prepared-statement interface (see pg_prepared).
_CREATED_ROW_TYPES = [kind for _, kind in CREATED_ROW_PARAMETERS]
_STORE_CREATED_CALL = PreparedCall(
    "kl_store_created_call",
    f"SELECT stale, event_position FROM {STORE_CREATED_FUNCTION}("
    "$1::uuid, $2::bigint, $3::uuid, $4::bigint, $5::uuid, $6::text, $7::bytea, "
    + ", ".join(f"${n}::{kind}" for n, (_, kind) in enumerate(CREATED_ROW_PARAMETERS, start=8))
    + ")",
)
# Each server function's flag on the recorder: False once the schema was found to lack it.
_FUNCTION_FLAGS = {
    APPEND_READ_FUNCTION: "_single_read_function",
    APPEND_READS_FUNCTION: "_append_function",
    APPEND_UNIT_FUNCTION: "_unit_function",
    BEGIN_WRITE_FUNCTION: "_unit_pipeline",
    STORE_CREATED_FUNCTION: "_created_function",
    STORE_UPDATED_FUNCTION: "_updated_function",
}
_STORED_ROW_TYPES = [kind for _, kind in STORED_ROW_PARAMETERS]
_STORE_UPDATED_CALL = PreparedCall(
    "kl_store_updated_call",
    "SELECT stale, event_position, stored_count, stored_last_accessed_at "
    f"FROM {STORE_UPDATED_FUNCTION}("
    "$1::uuid, $2::bigint, $3::uuid, $4::bigint, $5::uuid, $6::bigint, $7::text, $8::bytea, "
    "$9::boolean, "
    + ", ".join(f"${n}::{kind}" for n, (_, kind) in enumerate(STORED_ROW_PARAMETERS, start=10))
    + f", ${10 + len(STORED_ROW_PARAMETERS)}::text, ${11 + len(STORED_ROW_PARAMETERS)}::text)",
)
_APPEND_READS_CALL = PreparedCall(
    "kl_append_reads_call",
    "SELECT stale, positions, counted_tenants, counted_names, counted "
    f"FROM {APPEND_READS_FUNCTION}($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], "
    "$5::bytea[], $6::text[], $7::text[], $8::bigint[], $9::bigint[])",
)
_APPEND_READ_CALL = PreparedCall(
    "kl_append_read_call",
    f"SELECT stale, read_position, read_count FROM {APPEND_READ_FUNCTION}("
    "$1::uuid, $2::bigint, $3::uuid, $4::bigint, $5::uuid, $6::text, $7::bytea, "
    "$8::text, $9::text, $10::bigint)",
)
PROJECTION_LOCK_ID = 0x6B6C_7072_6F6A  # "klproj"
_BEGIN_PROJECTING = f"BEGIN; SELECT pg_advisory_xact_lock({PROJECTION_LOCK_ID})".encode()


def _single(batch: Sequence[PendingRead]) -> bool:
    """A lone read decided on at most two versions (its secret's and keyring's)."""
    return len(batch) == 1 and 1 <= len(batch[0].expected) <= 2


@contextmanager
def _closed_unless_queued(conn: Connection[Any]) -> Iterator[None]:
    """Close ``conn`` if the block queuing a unit's pipeline raises.

    A unit sent without BEGIN is the pipeline's implicit transaction: the server commits
    whatever it received at the pipeline's Sync, and psycopg sends that Sync when its
    pipeline block exits, an exception or not. A unit interrupted half-queued (a failing
    projection, Ctrl-C) must not be committed half: closing the connection first leaves
    the server nothing to do but roll it back. (psycopg then logs that terminating the
    pipeline failed.) An error the server reported while the rest was being queued (a
    stale decision, say: it carries a SQLSTATE) needs none of that: the server has already
    aborted the transaction and skips everything up to the Sync; the caller handles it."""
    try:
        yield
    except BaseException as error:
        if getattr(error, "sqlstate", None) is None:
            conn.close()
        raise


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode()


def _uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(value)


def _answered(conn: Connection[Any]) -> bool:
    """Whether the connection of a failed call still stands: the server answered with
    the error (a lock timeout, a stale decision), so it ended the transaction, and
    nothing was written. Lost, psycopg marks it broken, or closed when libpq found the
    socket gone first ("connection socket closed", a timing matter)."""
    return not (conn.broken or conn.closed)


def _has_pending_input(conn: Connection[Any]) -> bool:
    """Whether an idle connection has something to read: the server closed it (or sent a
    notice) while it sat in the pool. Work is then only sent after a BEGIN proved the
    connection alive, so that a dead one is replaced without any doubt about what ran."""
    try:  # poll, not select: select refuses descriptors past 1023 (a busy server's)
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


class _Translated:
    """Driver and pool failures become ``StorageError``; conflicts stay ``IntegrityError``.
    (A plain class: a generator-based context manager costs several times as much, on
    every write.)"""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if error is None or isinstance(error, IntegrityError):
            return
        if isinstance(error, psycopg.errors.UniqueViolation):
            raise IntegrityError(str(error)) from None
        if isinstance(error, PoolClosed) or isinstance(error.__cause__, PoolClosed):
            raise StorageError(STORE_CLOSED) from None  # (the library wraps the pool's error)
        if isinstance(error, (OperationalError, InterfaceError, psycopg.OperationalError)):
            raise StorageError(
                f"PostgreSQL unavailable or lock timeout: {_first_line(error)}"
            ) from None
        if isinstance(error, (PersistenceError, psycopg.Error)):
            raise StorageError(f"PostgreSQL error: {_first_line(error)}") from None


_translated = _Translated

SHRED_RETRY_SECONDS = 0.05  # between two tries of a shred kept from finishing
SHRED_REWRITE_SECONDS = 1.0  # at most one shred rewrite a second while it waits
LISTEN_SLICE_SECONDS = 0.5  # how soon a worker's idle wait notices that the store closed


def _messages_in_english(conn: Connection[Any]) -> bool:
    """Set this session's ``lc_messages`` to C where the role may (a superuser, or a role
    granted SET on it): True when it did. The report is read in any language
    (pg_vacuum_report); in English, a report the server sends without its routine's
    name can be read too."""
    try:
        conn.execute("SET lc_messages TO 'C'")
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


class _Pooled:
    """The context of ``_pooled``: a connection from the pool, returned to it on exit."""

    __slots__ = ("_conn", "_library", "_recorder")

    _conn: Connection[Any]

    def __init__(self, recorder: _PostgresSchemaMixin) -> None:
        self._recorder = recorder
        self._library: AbstractContextManager[Connection[Any]] | None = None

    def __enter__(self) -> Connection[Any]:
        pool = self._recorder.datastore.pool
        if pool.closed:  # not opened yet: the library opens it
            self._library = self._recorder._connection()
            conn: Connection[Any] = self._library.__enter__()
            return conn
        conn = pool.getconn()
        self._conn = conn
        return conn

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool | None:
        if self._library is not None:
            return self._library.__exit__(kind, error, traceback)
        self._recorder.datastore.pool.putconn(self._conn)
        return None


def _pinned(datastore: Any) -> PinnedReader:
    """The datastore's reader pinned per thread while it holds a write transaction (see
    held_writes); made with the datastore's ``get_connection`` (the factory's)."""
    pinned = vars(datastore).get("keyledger_pinned")
    if pinned is None:
        pinned = vars(datastore)["keyledger_pinned"] = PinnedReader()
    assert isinstance(pinned, PinnedReader)
    return pinned


def _refused_once_closed(datastore: Any) -> Callable[[], AbstractContextManager[Any]]:
    """The datastore's ``get_connection``, refusing once the factory closed it: a pool
    that was never opened (a forked child's, see pg_fork) would open on first use, and a
    closed service would work again."""
    library_get_connection = datastore.get_connection

    pinned = _pinned(datastore)

    @contextmanager
    def get_connection() -> Iterator[Any]:
        if pg_fork.is_closed(datastore):  # (as the library reports the pool's error)
            raise OperationalError("the pool is closed") from PoolClosed("the pool is closed")
        if pinned.conn is not None:  # this thread holds a write transaction: its reads
            yield pinned.conn
            return
        with library_get_connection() as conn:
            yield conn

    return get_connection


# Composite types registered in this process, by (host, port, database, qualified name):
# psycopg keeps the classes it makes for each registration, so each type is registered
# once and its registration reused by every later datastore (while the type's oid holds).
_COMPOSITES: dict[tuple[Any, ...], CompositeInfo] = {}


def _shared_type_adapters(datastore: Any) -> Callable[[], None]:
    """The datastore's ``register_type_adapters``, as the library's, sharing one
    registration of each type across the process's datastores."""

    def register_type_adapters() -> None:
        names = [n for n in datastore.db_type_names if n not in datastore.psycopg_type_adapters]
        if not names:
            return
        with datastore.get_connection() as conn:
            for name in names:
                qualified = f"{datastore.schema}.{name}"
                found = (
                    conn.cursor(row_factory=tuple_row)
                    .execute("SELECT to_regtype(%s)::oid", (qualified,))
                    .fetchone()
                )
                if found is None or found[0] is None:
                    continue  # not created yet (create_table registers it then)
                key = (conn.info.host, conn.info.port, conn.info.dbname, qualified)
                info = _COMPOSITES.get(key)
                if info is None or info.oid != found[0]:  # first, or the type was remade
                    info = CompositeInfo.fetch(conn, qualified)
                    if info is None:
                        continue
                    _COMPOSITES[key] = info
                register_composite(info, conn)
                datastore.psycopg_type_adapters[name] = info
                datastore.psycopg_python_types[name] = info.python_type

    return register_type_adapters


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class KeyledgerPostgresFactory(PostgresFactory):
    """Infrastructure factory selected with PERSISTENCE_MODULE (see database_url.py)."""

    application_recorder_class = KeyledgerPostgresRecorder
    aggregate_recorder_class = KeyledgerPostgresSnapshotRecorder

    def close(self) -> None:
        pg_fork.mark_closed(self.datastore)  # (before its pool closes: see pg_fork)
        super().close()

    def unreachable_reason(self) -> str | None:
        """Why a connection to the server cannot be made (one attempt, up to 5 s), from
        the server or libpq: "database ... does not exist", an authentication failure.
        The pool only says it got no connection in time (found by review). None when a
        connection can be made. libpq's messages name host, port, user and database,
        never the password."""
        pool = self.datastore.pool
        try:  # (the pool may take either as a function that makes it)
            conninfo = pool.conninfo() if callable(pool.conninfo) else pool.conninfo
            kwargs = pool.kwargs() if callable(pool.kwargs) else pool.kwargs or {}
            psycopg.connect(conninfo, **{**kwargs, "connect_timeout": 5}).close()
        except psycopg.Error as error:
            return " ".join(_first_line(error).split())  # (libpq pads with spaces)
        except Exception as error:  # a reason all the same, whatever raised it
            return type(error).__name__
        return None

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        # Session settings for every connection the pool opens, the library's included:
        # the schema first on the search path, and a lock timeout for reads too (the
        # library sets one only inside its writes).
        datastore = self.datastore
        options = (
            f"-c search_path={datastore.schema} -c lock_timeout={int(datastore.lock_timeout)}s"
            " -c client_encoding=UTF8"  # the packed text arrays (pg_arrays) are UTF-8
        )
        kwargs = datastore.pool.kwargs
        assert isinstance(kwargs, dict)
        datastore.pool.kwargs = {**kwargs, "options": options}
        pg_fork.track(datastore)  # a forked child gets connections of its own (pg_fork)
        vars(datastore)["get_connection"] = _refused_once_closed(datastore)
        # The library registers its composite type (stored_event_uuid, which its snapshot
        # recorder inserts with) for every datastore, and psycopg caches the classes it
        # makes per registration, for good: 13 KB kept per service ever opened (found by
        # review). One registration per type per process instead (_shared_type_adapters).
        vars(datastore)["register_type_adapters"] = _shared_type_adapters(datastore)
