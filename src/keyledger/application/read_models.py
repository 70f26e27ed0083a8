"""Keeping the read models current: audit catch-up, full rebuilds, the projection worker.

Each replays stored events through the same projection code that runs inline. Catch-up
and rebuild work in batched transactions (``RecordersProtocol.projecting``): maintainers
take turns, appends go on between (and, on PostgreSQL, during) batches, and every batch
advances its tracking position in the transaction that writes its rows, so a crash leaves
the last committed batch and no event is ever applied twice.

A rebuild builds the read models aside (``kl_*_rebuild_<set>`` tables, replayed in
batches while the live ones keep answering), then switches under the write lock and the
maintainers' lock: the last events are replayed, the old tables dropped, the new ones
renamed and indexed, in one transaction. It rebuilds every read model or the named ones:
one projector writes both the catalog and the key inventory, so those two are rebuilt
together; the audit model alone is the other.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, StoredEvent

from keyledger.application.row_errors import read_model_errors
from keyledger.application.stream import undecodable
from keyledger.errors import AuditTampered, StorageError
from keyledger.infrastructure.audit_keys import AuditKeyring
from keyledger.infrastructure.event_tags import TagRefused, require_tag
from keyledger.infrastructure.lost_tables import CATALOG_LOST
from keyledger.infrastructure.read_events import READ_TOPIC, decode_read
from keyledger.projections.audit import AUDIT_TRACKING_NAME, AuditProjector
from keyledger.projections.catalog import CatalogProjector
from keyledger.projections.projector import REPEATED_ROWS
from keyledger.projections.schema import (
    INDEX_NAMES,
    REBUILT_TABLES,
    Dialect,
    has_table,
    index_statements,
    read_model_table_statements,
    sqlite_index_statements,
    tracking_table_statement,
)

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger

PAGE_SIZE = 1000
FOREIGN_CHUNK = 500  # positions per IN (...) list when reading other processes' events
REBUILD_SUFFIX = "_rebuild"
Progress = Callable[[int], None]
ReplayPage = Callable[[Any], list[tuple[int, object]]]  # a rebuild's next page, applied


def _uuid(value: object) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def _page(ledger: Ledger, cur: Any, after: int) -> list[tuple[int, object]]:
    """Up to PAGE_SIZE events after ``after``, decoded, with their positions (reads, most
    of the stream, as ``ReadView``s: the projections need nothing else of them)."""
    table, position = ledger.store.events_table_name, ledger.store.position_column
    cur.execute(
        f"SELECT {position}, originator_id, originator_version, topic, state "
        f"FROM {table} WHERE {position} > ? ORDER BY {position} LIMIT ?",
        (after, PAGE_SIZE),
    )
    return _decoded(ledger, cur.fetchall())


def _decoded(ledger: Ledger, rows: list[Any]) -> list[tuple[int, object]]:
    """(position, event) of rows of (position, originator_id, version, topic, state);
    ``AuditTampered`` naming the first row whose bytes do not decode."""
    if ledger.require_tags:  # KEYLEDGER_REQUIRE_EVENT_TAGS: every row's, checked once
        _require_tags(ledger.audit_keys, rows)
    to_domain_event = ledger.tagging_mapper.decode  # (so not checked again here)
    try:  # one comprehension, inline: replays decode every event through here
        return [
            (
                row[0],
                decode_read(bytes(row[4]))
                if row[3] == READ_TOPIC
                else to_domain_event(StoredEvent(_uuid(row[1]), row[2], row[3], bytes(row[4]))),
            )
            for row in rows
        ]
    except Exception:  # whatever the library raises on bytes it cannot read
        for row in rows:  # which one, for the error (rare: a tampered stream)
            try:
                _decode(to_domain_event, row)
            except Exception:
                raise undecodable(int(row[0])) from None
        raise


def _require_tags(keys: AuditKeyring, rows: list[Any]) -> None:
    """``TagRefused``, naming its position, for the first row whose tag does not verify."""
    for row in rows:
        try:
            require_tag(keys, StoredEvent(_uuid(row[1]), row[2], row[3], bytes(row[4])))
        except TagRefused as refused:
            raise refused.at(int(row[0])) from None
        except Exception:  # columns that hold no event: as the decoding reports them
            raise undecodable(int(row[0])) from None


def _decode(to_domain_event: Any, row: Any) -> object:
    """One row's event, as ``_decoded``'s comprehension decodes it."""
    if row[3] == READ_TOPIC:
        return decode_read(bytes(row[4]))
    return to_domain_event(StoredEvent(_uuid(row[1]), row[2], row[3], bytes(row[4])))


def _catch_up_page(ledger: Ledger, cur: Any, after: int, head: int) -> list[tuple[int, object]]:
    """``_page``, taking the events this process appended from ``ledger.appended`` as they
    are: only the positions are read, and only other processes' events are decoded.

    ``head`` is a stream position known to be committed, with every position below it
    committed or never to be (positions commit in order). When this process appended
    every position after ``after`` up to the page's end or ``head``, those events are
    the page, and nothing is read (the common case of a single writer)."""
    known = ledger.appended
    if not known:
        return _page(ledger, cur, after)
    if head > after:
        try:
            return known.run(after + 1, min(after + PAGE_SIZE, head))
        except KeyError:  # another process appended in between: read which positions exist
            pass
    table, position = ledger.store.events_table_name, ledger.store.position_column
    cur.execute(
        f"SELECT {position} FROM {table} WHERE {position} > ? ORDER BY {position} LIMIT ?",
        (after, PAGE_SIZE),
    )
    positions = [int(row[0]) for row in cur.fetchall()]
    foreign = [p for p in positions if p not in known]
    decoded: dict[int, object] = {}
    for start in range(0, len(foreign), FOREIGN_CHUNK):
        chunk = foreign[start : start + FOREIGN_CHUNK]
        cur.execute(
            f"SELECT {position}, originator_id, originator_version, topic, state "
            f"FROM {table} WHERE {position} IN ({','.join('?' * len(chunk))})",
            chunk,
        )
        decoded.update(_decoded(ledger, cur.fetchall()))
    return [(p, known[p] if p in known else decoded[p]) for p in positions]


def _forget_appended(ledger: Ledger, reached: int) -> None:
    """Drop remembered events the audit model has caught up with (by now or elsewhere)."""
    ledger.appended.forget_through(reached)


def tracked_position(cur: Any, table: str = "kl_tracking") -> int:
    cur.execute(f"SELECT position FROM {table} WHERE name=?", (AUDIT_TRACKING_NAME,))
    row = cur.fetchone()
    return int(row[0]) if row else 0


@read_model_errors
def audit_position(ledger: Ledger) -> tuple[int, int]:
    """(position the audit model reached, position of the stream head)."""
    with ledger.reading() as cur:
        return tracked_position(cur), _checked_head(ledger, cur)


def check_positions_assigned(ledger: Ledger) -> None:
    """(PostgreSQL; nothing elsewhere) ``_check_head_was_assigned`` on its own: for the
    readers of the stream itself (an export), which must not depend on a read model."""
    if ledger.store.dialect == "postgres":
        with ledger.reading() as cur:
            _checked_head(ledger, cur)


def _checked_head(ledger: Ledger, cur: Any) -> int:
    """The stream's newest position (0: none); on PostgreSQL, one the sequence assigned."""
    table, position = ledger.store.events_table_name, ledger.store.position_column
    cur.execute(f"SELECT MAX({position}) FROM {table}")
    head = int(cur.fetchone()[0] or 0)
    if ledger.store.dialect == "postgres":
        _check_head_was_assigned(cur, table, head)
    return head


@contextmanager
def owner_needed(what: str, then: str = "") -> Iterator[None]:
    """A refusal of the database to let this role make tables, with what to do: a
    rebuild or a check replays into tables of its own, which the documented application
    role of PostgreSQL may not make (it said only "permission denied for schema ...").
    ``what`` makes them; ``then``: what to run after the owner's rebuild."""
    try:
        yield
    except StorageError as error:
        if "permission denied" not in str(error):
            raise
        raise StorageError(
            f"{what} replays the stream into new tables, which this role may not make: "
            f"run it as the tables' owner{then} (docs/postgresql.md, roles) ({error})"
        ) from None


def _check_head_was_assigned(cur: Any, table: str, head: int) -> None:
    """(PostgreSQL) ``AuditTampered`` when the newest position is beyond what the
    sequence ever handed out: a row inserted with a position of its own choosing (any
    role with INSERT on the events table can). The audit model caught up to it, and
    every event appended after it, numbered below it by the sequence, never reached the
    audit queries, the trail or a resumed export (found by review). Refusing keeps them
    from answering without those events; docs/postgresql.md grants the application
    INSERT on the other columns only."""
    cur.execute(
        "SELECT pg_sequence_last_value(pg_get_serial_sequence(?, 'notification_id'))",
        (table,),
    )
    assigned = int(cur.fetchone()[0] or 0)
    if head > assigned:
        raise AuditTampered(
            f"the event at position {head} has a position the store never assigned (its "
            f"sequence is at {assigned}): a row was inserted with a chosen position, and "
            "events appended after it would be missing from the audit queries; run "
            "`keyledger audit verify`, and see docs/postgresql.md (roles). (A restore or "
            "a logical replica that did not carry the sequence over leaves it behind too: "
            "docs/postgresql.md, Checking)"
        )


@read_model_errors
def audit_lag(ledger: Ledger) -> int:
    """How many events the audit model has still to apply. Not the difference of the
    positions: on PostgreSQL every rolled-back write (a lost race, say) uses up a
    position, so the stream has gaps, and the difference overstates the lag."""
    table, position = ledger.store.events_table_name, ledger.store.position_column
    with ledger.reading() as cur:
        reached = tracked_position(cur)
        cur.execute(f"SELECT COUNT(*) FROM {table} WHERE {position} > ?", (reached,))
        return int(cur.fetchone()[0])


@read_model_errors
def catch_up_audit(
    ledger: Ledger, progress: Progress | None = None, stop: Callable[[], bool] | None = None
) -> int:
    """Project every event after the audit model's position; returns events applied.
    ``stop()`` is asked between pages (each its own transaction): a worker told to stop
    leaves after the page it is applying, not after its whole backlog."""
    reached, head = audit_position(ledger)
    if reached > head:  # never by keyledger: it would hide every event up to ``reached``
        raise StorageError(
            f"the audit read model claims position {reached}, beyond the stream's newest "
            f"event at {head} (kl_tracking was changed outside keyledger, or events were "
            "deleted): audit queries would miss what follows; run `keyledger projections "
            "rebuild audit` and `keyledger audit verify`"
        )
    if reached == head:
        _forget_appended(ledger, reached)
        return 0
    projector = AuditProjector()
    applied = 0
    while True:
        try:
            with ledger.store.projecting() as cur:
                reached = tracked_position(cur)
                items = _catch_up_page(ledger, cur, reached, head)
                projector.apply(cur, items)
        except IntegrityError:  # rows already there: kl_tracking was set back by hand
            raise StorageError(
                "the audit read model cannot catch up: it already holds rows after its "
                "tracked position (kl_tracking was changed outside keyledger); run "
                "`keyledger projections rebuild audit`"
            ) from None
        if items:
            reached = items[-1][0]
        _forget_appended(ledger, reached)
        applied += len(items)
        if progress and items:
            progress(len(items))
        if len(items) < PAGE_SIZE or (stop is not None and stop()):
            return applied


# Each read model's name, and the tables its rebuild replaces (kl_tracking holds the audit
# model's position). The catalog projector writes kl_catalog and kl_keys alike.
READ_MODELS: dict[str, tuple[str, ...]] = {
    "catalog": ("kl_catalog", "kl_keys"),
    "audit": ("kl_audit", "kl_tracking"),
    "keys": ("kl_catalog", "kl_keys"),
}


def rebuilt_together(names: Collection[str] | None) -> list[str]:
    """The read models a rebuild of ``names`` (None: all) rebuilds, in READ_MODELS order:
    naming the catalog or the keys rebuilds both."""
    if names is None:
        return list(READ_MODELS)
    unknown = sorted(set(names) - set(READ_MODELS))
    if unknown:
        raise ValueError(f"no read model {unknown[0]!r}: one of {', '.join(READ_MODELS)}")
    if not names:
        raise ValueError(f"no read model named: give some of {', '.join(READ_MODELS)}")
    tables = {table for name in names for table in READ_MODELS[name]}
    return [name for name, own in READ_MODELS.items() if set(own) <= tables]


class _Renaming:
    """A cursor whose statements address the rebuild's copies of some tables."""

    def __init__(self, cur: Any, tables: frozenset[str], suffix: str) -> None:
        self._cur = cur
        self._tables = tables
        self._suffix = suffix
        self.dialect = getattr(cur, "dialect", "sqlite")

    def execute(self, statement: str, params: Any = ()) -> Any:
        return self._cur.execute(_renamed(statement, self._tables, self._suffix), params)

    def executemany(self, statement: str, params: Any) -> Any:
        return self._cur.executemany(_renamed(statement, self._tables, self._suffix), params)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> Any:
        return self._cur.fetchall()


@lru_cache(maxsize=256)
def _renamed(statement: str, tables: frozenset[str], suffix: str) -> str:
    pattern = r"\b(" + "|".join(sorted(tables)) + r")\b"
    return re.sub(pattern, r"\1" + suffix, statement)


def read_model_tables(models: Collection[str]) -> frozenset[str]:
    """The live tables of the read models ``models`` (kl_tracking among them for audit)."""
    return frozenset(table for name in models for table in READ_MODELS[name])


def copies_name(models: Collection[str]) -> str:
    """The part of the copies' suffix that names the set of read models built aside."""
    return "all" if len(models) == len(READ_MODELS) else next(iter(models))


def create_copies(
    cur: Any, dialect: Dialect, tables: frozenset[str], suffix: str, *, indexed: bool
) -> None:
    """(Re)create empty copies of the read-model tables, named with ``suffix``; with
    ``indexed``, SQLite's audit copy gets its indexes from the start."""
    drop_copies(cur, suffix)
    for statement in read_model_table_statements(dialect, suffix):
        cur.execute(statement)
    if indexed and dialect == "sqlite" and "kl_audit" in tables:
        # Indexed from the start: SQLite has one write lock for the whole file, so an
        # index built in one go before the switch would hold it as long as one built
        # in the switch. Kept up batch by batch, it costs each batch a little more.
        for statement in sqlite_index_statements(cur, "kl_audit" + suffix, suffix):
            cur.execute(statement)


def drop_copies(cur: Any, suffix: str) -> None:
    """Drop the copies named with ``suffix``, where they exist."""
    for table in REBUILT_TABLES:
        cur.execute(f"DROP TABLE IF EXISTS {table}{suffix}")


def copy_replayer(ledger: Ledger, tables: frozenset[str], suffix: str) -> ReplayPage:
    """What applies the next page of the stream to the copies of ``tables`` (their
    position, kept in the copy of kl_tracking, advancing with the rows); returns it."""
    renamed = tables | {"kl_tracking"}  # the copy of kl_tracking holds the replay position
    tracking_copy = "kl_tracking" + suffix
    projectors: list[Any] = []
    if "kl_catalog" in tables:
        projectors.append(CatalogProjector())
    if "kl_audit" in tables:
        projectors.append(AuditProjector())

    def replay_page(cur: Any) -> list[tuple[int, object]]:
        items = _page(ledger, cur, tracked_position(cur, tracking_copy))
        if items:
            shadow = _Renaming(cur, renamed, suffix)
            for projector in projectors:
                projector.apply(shadow, items)
            cur.execute(
                f"UPDATE {tracking_copy} SET position=? WHERE name=?",
                (items[-1][0], AUDIT_TRACKING_NAME),
            )
        return items

    return replay_page


def rebuild_read_models(
    ledger: Ledger, progress: Progress | None = None, names: Collection[str] | None = None
) -> int:
    """Rebuild the read models ``names`` (None: every one; see ``rebuilt_together``) aside
    from the whole stream, then switch; returns the events replayed.

    The copies are named after the set of read models rebuilt (``kl_audit_rebuild_audit``,
    ...), so rebuilds of different sets never touch each other's copies. The replay's
    position is kept in the copy of kl_tracking, advanced in the transaction that writes
    the batch: two rebuilds of the same set share the work batch by batch, a rebuild that
    starts afresh (dropping the copies) sends the other back to the first event, and the
    first to switch ends the other with an error (its copies are gone).
    """
    store = ledger.store
    models = rebuilt_together(names)
    tables = read_model_tables(models)
    suffix = REBUILD_SUFFIX + "_" + copies_name(models)
    tracking_copy = "kl_tracking" + suffix
    replay_page = copy_replayer(ledger, tables, suffix)
    with store.projecting() as cur:
        for table in REBUILT_TABLES:
            cur.execute(f"DROP TABLE IF EXISTS {table}{REBUILD_SUFFIX}")  # 0.7's, if left
        create_copies(cur, store.dialect, tables, suffix, indexed=True)
    try:
        replayed = _replay_and_switch(ledger, tables, suffix, replay_page, progress)
    except IntegrityError:  # (the events table lost its key: an event stored twice)
        raise StorageError(REPEATED_ROWS) from None
    except StorageError:
        if table_lost(ledger, tracking_copy):
            raise StorageError(
                f"the rebuild of {' and '.join(models)} lost its working tables: another "
                "rebuild of the same read models switched them in first (they are current)"
            ) from None
        raise
    return replayed


def _replay_and_switch(
    ledger: Ledger,
    tables: frozenset[str],
    suffix: str,
    replay_page: ReplayPage,
    progress: Progress | None,
) -> int:
    """The bulk of a rebuild, then its switch; returns the events replayed."""
    store = ledger.store
    # The bulk, in batches, while the live read models keep answering.
    replayed = replay_in_batches(store, replay_page, progress)
    while True:
        _index_copies(store, tables, suffix)
        try:
            tail = _switch(store, tables, suffix, replay_page)
        except TooFarBehind:  # the copies were reset meanwhile: not under the write lock
            replayed += replay_in_batches(store, replay_page, progress)
            continue
        if progress and tail:
            progress(tail)
        return replayed + tail


class TooFarBehind(Exception):
    """A switch found a full page still to replay (another rebuild reset the copies)."""


def replay_in_batches(
    store: Any,
    replay_page: ReplayPage,
    progress: Progress | None,
) -> int:
    replayed = 0
    while True:
        with store.projecting() as cur:
            items = replay_page(cur)
        replayed += len(items)
        if progress and items:
            progress(len(items))
        if len(items) < PAGE_SIZE:
            return replayed


def _index_copies(store: Any, tables: frozenset[str], suffix: str) -> None:
    """On PostgreSQL, index the copies before the switch, under names with ``suffix``:
    the switch then only renames them. Built in the switch, they held the write lock,
    and so every write, for seconds on a large audit model (about 6 us a row): past a
    writer's lock timeout at a few million. (SQLite's copies are indexed from the start.)"""
    if store.dialect != "postgres" or "kl_audit" not in tables:
        return
    with store.projecting() as cur:
        for statement in index_statements():
            cur.execute(_renamed(statement, _AUDIT_AND_INDEXES, suffix))


_AUDIT_AND_INDEXES = frozenset({"kl_audit", *INDEX_NAMES})


def _switch(
    store: Any,
    tables: frozenset[str],
    suffix: str,
    replay_page: ReplayPage,
) -> int:
    """Replay the last events and put the copies in place, in one transaction holding the
    write lock and the maintainers' lock; returns the events replayed in it."""
    tail = 0
    with store.writing() as cur:  # no append, and no maintainer, in between
        store.hold_maintainers(cur)
        while items := replay_page(cur):
            if len(items) == PAGE_SIZE and not tail:
                raise TooFarBehind  # rolls the transaction back
            tail += len(items)
        position = tracked_position(cur, "kl_tracking" + suffix)
        replaced = [t for t in _SWITCH_ORDER if t in tables]
        assert set(replaced) == tables - {"kl_tracking"}  # (a new read model: order it)
        if store.dialect == "postgres":  # every lock first, in the order readers take them
            present = [t for t in replaced if has_table(cur, t, postgres=True)]
            if present:
                cur.execute(f"LOCK TABLE {', '.join(present)} IN ACCESS EXCLUSIVE MODE")
        # A live table may be missing (dropped by hand, on a store opened without
        # creating tables): the rebuild restores it (SPEC section 4).
        for table in replaced:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(f"ALTER TABLE {table}{suffix} RENAME TO {table}")
        drop_copies(cur, suffix)
        if "kl_catalog" in tables:  # (the mark of a catalog created anew: lost_tables)
            cur.execute(tracking_table_statement(store.dialect))
            cur.execute("DELETE FROM kl_tracking WHERE name = ?", (CATALOG_LOST,))
        if "kl_audit" in tables:
            cur.execute(tracking_table_statement(store.dialect))
            cur.execute(
                "INSERT INTO kl_tracking (name, position) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                (AUDIT_TRACKING_NAME, position),
            )
            if store.dialect == "postgres":  # indexed before the switch: renamed only
                for name in INDEX_NAMES:
                    cur.execute(f"ALTER INDEX IF EXISTS {name}{suffix} RENAME TO {name}")
        # Present already (built before the switch, or with SQLite's copy): nothing to do.
        indexes = (
            index_statements() if store.dialect == "postgres" else sqlite_index_statements(cur)
        )
        for statement in indexes:
            cur.execute(statement)
    return tail


# The read models a switch replaces, in the order every reader that reads several of them
# in one transaction takes them (the key inventory and the drift diagnosis read kl_keys,
# then kl_catalog): dropping them in another order deadlocked with those readers.
_SWITCH_ORDER = ("kl_keys", "kl_catalog", "kl_audit")


def table_lost(ledger: Ledger, table: str) -> bool:
    """Whether ``table`` is gone (False when that cannot even be asked: the store's own
    error is the one to report then)."""
    try:
        with ledger.reading() as cur:
            return not has_table(cur, table, ledger.store.dialect == "postgres")
    except StorageError:
        return False


def follow(
    ledger: Ledger,
    *,
    stop: Callable[[], bool],
    wait: Callable[[float], None],
    idle_seconds: float = 1.0,
    on_progress: Callable[[int], None] | None = None,
    seal_when_idle: bool = True,
    on_retry: Callable[[StorageError, float], None] | None = None,
) -> int:
    """Keep the lagging read models current until ``stop()``; returns events applied.

    A ``StorageError`` (a lost connection, say) is tried again after a pause, up to
    ``FOLLOW_RETRIES`` times in a row, each announced to ``on_retry(error, seconds)``;
    then it is raised.

    Whenever it is idle, the worker also seals the audit stream (when it has an audit
    key), so the unsealed tail stays as short as the idle interval.

    ``wait(seconds)`` blocks until new events may exist (a NOTIFY on PostgreSQL, a plain
    sleep on SQLite) or the time is up. Each catch-up batch is one transaction that
    advances the tracking position with the rows, so a worker killed at any point resumes
    where its last commit left it and never applies an event twice.
    """
    applied = 0
    failures = 0
    while not stop():
        try:
            count = catch_up_audit(ledger, on_progress, stop)
            applied += count
            if not count:  # idle: seal, then wait for new events
                if seal_when_idle:
                    ledger.seal_automatically()
                wait(idle_seconds)
        except StorageError as error:
            # A connection the server ended mid-catch-up (an administrator's
            # pg_terminate_backend, a failover) is no reason to stop: the catch-up rolled
            # back, and the next one starts where the last commit left off. A database
            # that stays away ends the worker (found by review: one lost connection did).
            # The idle wait too: a LISTEN that could get no connection ended the worker
            # at once (found as a flaky test).
            failures += 1
            if failures > FOLLOW_RETRIES or ledger.closed:  # (closed: the end, not a loss)
                raise
            delay = FOLLOW_RETRY_DELAY * 2 ** (failures - 1)
            if on_retry is not None:
                on_retry(error, delay)
            _pause(delay, stop)
            continue
        failures = 0
    return applied


# How often in a row ``follow`` tries again after a StorageError, and its first pause in
# seconds (doubled each time: 1, 2, 4 s, so a database away for about 7 s ends the worker).
FOLLOW_RETRIES = 3
FOLLOW_RETRY_DELAY = 1.0


def _pause(seconds: float, stop: Callable[[], bool]) -> None:
    """Sleep ``seconds``, looking at ``stop()`` ten times a second."""
    deadline = time.monotonic() + seconds
    while not stop() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
