"""Checking the read models against the stream: `keyledger projections check`.

The read models are tables anyone who can write the database can edit, and nothing tags
their rows (docs/audit.md, "Read models are not evidence"). A check replays the stream
into copies of the read models, as a rebuild does (``kl_*_check_<set>`` tables, built
in batches while the live ones keep answering), then compares each live table with its
copy, row by row, and drops the copies: it changes no live row.

The catalog and the key inventory are written with the events, so they are compared
with their copies at one stream position. On PostgreSQL the last events are replayed and
the tables compared in one transaction holding the write lock (writers wait for the
comparison, a few microseconds a row); the audit model, keyed by position and only ever
extended, is compared afterwards without the lock, up to the position it had reached
(after catching up with the stream first). On SQLite the whole check runs in one read
snapshot, its copies TEMP tables of its connection: no lock at all.

Audit rows after the position the audit model reached cannot be there (it advances that
position with its rows): any is reported as unexpected.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from eventsourcing.persistence import IntegrityError

from keyledger.application.read_models import (
    PAGE_SIZE,
    Progress,
    ReplayPage,
    TooFarBehind,
    catch_up_audit,
    copies_name,
    copy_replayer,
    create_copies,
    drop_copies,
    read_model_tables,
    rebuilt_together,
    replay_in_batches,
    table_lost,
    tracked_position,
)
from keyledger.application.row_errors import read_model_errors
from keyledger.errors import StorageError
from keyledger.models import (
    DifferenceKind,
    ReadModelCheck,
    ReadModelDifference,
    ReadModelTable,
    TableComparison,
)
from keyledger.projections.projector import REPEATED_ROWS
from keyledger.projections.schema import READ_MODEL_COLUMNS, read_model_table_statements

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger

CHECK_SUFFIX = "_check"
EXAMPLES = 10  # rows listed per table and kind of difference (the counts are complete)
_LOCKED_TABLES: tuple[ReadModelTable, ...] = ("kl_catalog", "kl_keys")


def check_read_models(
    ledger: Ledger, progress: Progress | None = None, names: Collection[str] | None = None
) -> ReadModelCheck:
    """Compare the read models ``names`` (None: every one; the catalog and the keys go
    together, as in a rebuild) with a replay of the whole stream."""
    store = ledger.store
    models = rebuilt_together(names)
    tables = read_model_tables(models)
    suffix = CHECK_SUFFIX + "_" + copies_name(models)
    replay_page = copy_replayer(ledger, tables, suffix)
    if store.dialect == "sqlite":
        replayed, comparisons = _in_one_snapshot(ledger, tables, suffix, replay_page, progress)
        return _report(models, replayed, comparisons)
    with store.projecting() as cur:
        create_copies(cur, store.dialect, tables, suffix, indexed=False)
    try:
        with _no_repeated_rows():
            replayed, comparisons = _replay_and_compare(
                ledger, tables, suffix, replay_page, progress
            )
    except StorageError:
        if table_lost(ledger, "kl_tracking" + suffix):
            raise StorageError(
                f"the check of {' and '.join(models)} lost its working tables: another "
                "check of the same read models ended meanwhile; run it again"
            ) from None
        raise
    finally:
        with suppress(StorageError), store.projecting() as cur:
            drop_copies(cur, suffix)
    return _report(models, replayed, comparisons)


Compared = tuple[TableComparison, list[ReadModelDifference]]


@contextmanager
def _no_repeated_rows() -> Iterator[None]:
    """A replay into the copies that breaks their keys as ``StorageError`` saying why.
    The projections name the position of every copied event they can tell (see
    ``projections/catalog.py``); one they cannot still failed the check with an
    ``IntegrityError`` traceback, or the driver's message (found by review)."""
    try:
        yield
    except (IntegrityError, sqlite3.IntegrityError):
        raise StorageError(REPEATED_ROWS) from None


def _report(models: list[str], replayed: int, comparisons: list[Compared]) -> ReadModelCheck:
    differences = [difference for _, found in comparisons for difference in found]
    return ReadModelCheck(
        consistent=not differences,
        read_models=models,
        events_replayed=replayed,
        examples_per_kind=EXAMPLES,
        tables=[table for table, _ in comparisons],
        differences=differences,
    )


def _in_one_snapshot(
    ledger: Ledger,
    tables: frozenset[str],
    suffix: str,
    replay_page: ReplayPage,
    progress: Progress | None,
) -> tuple[int, list[Compared]]:
    """SQLite: the whole check in one read transaction, its copies TEMP tables of that
    connection. Writing them takes no lock of the database file, and the snapshot holds
    the events and the catalog at one position: writers go on throughout (the copies
    replayed in write transactions, as a rebuild's, kept writers waiting for seconds on a
    large store: found by review)."""
    if "kl_audit" in tables:
        catch_up_audit(ledger)  # so that it is compared as far as the stream goes
    replayed = 0
    with ledger.store.reading() as cur:
        for statement in read_model_table_statements("sqlite", suffix):
            cur.execute(statement.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))
        with _no_repeated_rows():  # (inside: reading() reports the driver's message)
            while items := replay_page(cur):
                replayed += len(items)
                if progress:
                    progress(len(items))
                if len(items) < PAGE_SIZE:
                    break
        position = tracked_position(cur, "kl_tracking" + suffix)
        comparisons = _catalog_comparisons(cur, "sqlite", tables, suffix, position)
        if "kl_audit" in tables:
            reached = tracked_position(cur)
            beyond = _rows_beyond(cur, reached)
            bound = min(position, reached)
            comparisons.append(_audit_comparison(cur, "sqlite", suffix, bound, beyond))
    return replayed, comparisons


def _catalog_comparisons(
    cur: Any, dialect: str, tables: frozenset[str], suffix: str, position: int
) -> list[Compared]:
    """The catalog and the key inventory against their copies at ``position``."""
    return [
        _compare(cur, dialect, table, suffix, position, None)
        for table in _LOCKED_TABLES
        if table in tables
    ]


def _audit_comparison(
    cur: Any, dialect: str, suffix: str, bound: int, beyond: tuple[int, list[ReadModelDifference]]
) -> Compared:
    """The audit model against its copy up to ``bound``, with the rows ``beyond`` it."""
    return _with_rows_beyond(_compare(cur, dialect, "kl_audit", suffix, bound, bound), beyond)


@read_model_errors
def _rows_beyond(cur: Any, reached: int) -> tuple[int, list[ReadModelDifference]]:
    """Audit rows after the position the audit model reached: it advances that position
    with its rows, in one transaction, so none can be there (a row forged beyond the
    stream's head showed first in `audit log`, and no comparison looked at it: found by
    review). Asked where no catch-up can write meanwhile."""
    cur.execute("SELECT COUNT(*) FROM kl_audit WHERE position > ?", (reached,))
    count = int(cur.fetchone()[0])
    if not count:
        return 0, []
    cur.execute(
        f"SELECT position FROM kl_audit WHERE position > ? ORDER BY position LIMIT {EXAMPLES}",
        (reached,),
    )
    found = [
        ReadModelDifference(table="kl_audit", kind="unexpected", position=int(row[0]))
        for row in cur.fetchall()
    ]
    return count, found


def _with_rows_beyond(
    compared: Compared, beyond: tuple[int, list[ReadModelDifference]]
) -> Compared:
    comparison, differences = compared
    count, found = beyond
    if not count:
        return compared
    shown = [d for d in differences if d.kind == "unexpected"]
    room = max(EXAMPLES - len(shown), 0)
    updated = comparison.model_copy(update={"unexpected": comparison.unexpected + count})
    return updated, [*differences, *found[:room]]


def _replay_and_compare(
    ledger: Ledger,
    tables: frozenset[str],
    suffix: str,
    replay_page: ReplayPage,
    progress: Progress | None,
) -> tuple[int, list[Compared]]:
    store = ledger.store
    replayed = replay_in_batches(store, replay_page, progress)
    audit = "kl_audit" in tables
    if audit:
        catch_up_audit(ledger)  # so that it is compared as far as the stream goes
    while True:
        try:
            with store.writing() as cur:  # no append, and no maintainer, in between
                store.hold_maintainers(cur)
                tail = 0
                while items := replay_page(cur):
                    if len(items) == PAGE_SIZE and not tail:
                        raise TooFarBehind  # reset meanwhile: replay without the lock
                    tail += len(items)
                position = tracked_position(cur, "kl_tracking" + suffix)
                comparisons = _catalog_comparisons(cur, store.dialect, tables, suffix, position)
                reached = tracked_position(cur) if audit else 0
                beyond = _rows_beyond(cur, reached) if audit else (0, [])
        except TooFarBehind:
            replayed += replay_in_batches(store, replay_page, progress)
            continue
        break
    replayed += tail
    if progress and tail:
        progress(tail)
    if audit:  # positions up to ``reached`` are final in both: no lock needed
        with store.reading() as cur:
            audited = _audit_comparison(cur, store.dialect, suffix, min(position, reached), beyond)
        comparisons.append(audited)
    return replayed, comparisons


def _compare(
    cur: Any,
    dialect: str,
    table: ReadModelTable,
    suffix: str,
    position: int,
    bound: int | None,
) -> Compared:
    """``table`` against its copy (audit entries up to position ``bound`` only)."""
    keys, columns = READ_MODEL_COLUMNS[table]
    copy = table + suffix
    joined = " AND ".join(f"live.{k} = copy.{k}" for k in keys)
    same_as = "IS" if dialect == "sqlite" else "IS NOT DISTINCT FROM"  # NULL-safe equality
    same = " AND ".join(f"copy.{c} {same_as} live.{c}" for c in columns)
    params: tuple[int, ...] = () if bound is None else (bound,)

    def within(alias: str) -> str:
        return "1=1" if bound is None else f"{alias}.position <= ?"

    def key_list(alias: str) -> str:
        return ", ".join(f"{alias}.{k}" for k in keys)

    # Each kind: its FROM ... WHERE, and the columns that name (and compare) its rows.
    kinds: dict[DifferenceKind, tuple[str, str]] = {
        "missing": (
            f"FROM {copy} AS copy WHERE {within('copy')} AND NOT EXISTS "
            f"(SELECT 1 FROM {table} AS live WHERE {joined})",
            key_list("copy"),
        ),
        "unexpected": (
            f"FROM {table} AS live WHERE {within('live')} AND NOT EXISTS "
            f"(SELECT 1 FROM {copy} AS copy WHERE {joined})",
            key_list("live"),
        ),
        "altered": (
            f"FROM {copy} AS copy JOIN {table} AS live ON {joined} "
            f"WHERE {within('copy')} AND NOT ({same})",
            ", ".join(
                [key_list("copy"), *(f"copy.{c}" for c in columns), *(f"live.{c}" for c in columns)]
            ),
        ),
    }
    cur.execute(f"SELECT COUNT(*) FROM {copy} AS copy WHERE {within('copy')}", params)
    rows = int(cur.fetchone()[0])
    counts: dict[DifferenceKind, int] = {}
    differences: list[ReadModelDifference] = []
    for kind, (source, selected) in kinds.items():
        cur.execute(f"SELECT COUNT(*) {source}", params)
        counts[kind] = int(cur.fetchone()[0])
        if not counts[kind]:
            continue
        order = ", ".join(selected.split(", ")[: len(keys)])
        cur.execute(f"SELECT {selected} {source} ORDER BY {order} LIMIT {EXAMPLES}", params)
        for row in cur.fetchall():
            differences.append(_difference(table, kind, keys, columns, tuple(row)))
    comparison = TableComparison(
        table=table,
        position=position,
        rows=rows,
        missing=counts["missing"],
        unexpected=counts["unexpected"],
        altered=counts["altered"],
    )
    return comparison, differences


@read_model_errors
def _difference(
    table: ReadModelTable,
    kind: DifferenceKind,
    keys: tuple[str, ...],
    columns: tuple[str, ...],
    row: tuple[Any, ...],
) -> ReadModelDifference:
    """A difference named by its key; an altered row's differing columns (not values).
    A live row's key edited to another type (a key version that is text) is
    ``StorageError``: it was a pydantic traceback (found by review)."""
    named = dict(zip(keys, row, strict=False))
    differing: list[str] = []
    if kind == "altered":
        start = len(keys)
        replayed, live = row[start : start + len(columns)], row[start + len(columns) :]
        differing = [c for c, a, b in zip(columns, replayed, live, strict=True) if a != b]
    return ReadModelDifference(
        table=table,
        kind=kind,
        tenant_id=named.get("tenant_id"),
        name=named.get("name"),
        version=named.get("version"),
        position=named.get("position"),
        columns=differing,
    )
